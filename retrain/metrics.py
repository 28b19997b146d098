"""Segmentation metrics from a confusion matrix (pure NumPy)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from segsvc.ml import CLASS_NAMES, NUM_CLASSES

ConfusionMatrix = npt.NDArray[np.int64]


def confusion_matrix(
    true: npt.ArrayLike, pred: npt.ArrayLike, num_classes: int = NUM_CLASSES
) -> ConfusionMatrix:
    """Counts[t, p] of pixels with true class t predicted as p; values >= num_classes ignored."""
    t = np.asarray(true, dtype=np.int64).ravel()
    p = np.asarray(pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"shape mismatch: {np.shape(true)} vs {np.shape(pred)}")
    keep = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    flat = np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def pixel_accuracy(cm: ConfusionMatrix) -> float:
    """Share of pixels predicted correctly."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def per_class_iou(cm: ConfusionMatrix) -> list[float]:
    """TP / (TP + FP + FN) per class; NaN for a class absent from both truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return [float(v) for v in np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)]


def mean_iou(cm: ConfusionMatrix) -> float:
    """Mean IoU over the classes that occur (as Keras MeanIoU does)."""
    ious = [v for v in per_class_iou(cm) if not np.isnan(v)]
    return float(np.mean(ious)) if ious else float("nan")


def summarize(cm: ConfusionMatrix) -> dict[str, object]:
    """Pixel accuracy, mean IoU, per-class IoU by class name, and the matrix itself."""
    return {
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_iou": mean_iou(cm),
        # A class in neither truth nor prediction has no IoU: None (JSON null), not NaN, which
        # JSON does not have (Postgres refused the run's metrics with it).
        "per_class_iou": {
            name: None if math.isnan(iou) else iou
            for name, iou in zip(CLASS_NAMES, per_class_iou(cm), strict=True)
        },
        "confusion_matrix": cm.tolist(),
        "pixels": int(cm.sum()),
    }
