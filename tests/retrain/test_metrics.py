"""Confusion-matrix metrics on hand-made masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrain.metrics import confusion_matrix, mean_iou, per_class_iou, pixel_accuracy, summarize


def test_known_values() -> None:
    true = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]])
    pred = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 0, 1]])
    cm = confusion_matrix(true, pred)
    assert cm.tolist() == [[3, 1, 0], [0, 4, 0], [1, 1, 2]]
    assert pixel_accuracy(cm) == pytest.approx(9 / 12)
    # pet: TP 3, FP 1, FN 1 -> 3/5; background: 4/(4+2+0) -> 4/6; border: 2/(2+0+2) -> 1/2
    assert per_class_iou(cm) == pytest.approx([3 / 5, 4 / 6, 1 / 2])
    assert mean_iou(cm) == pytest.approx((3 / 5 + 4 / 6 + 1 / 2) / 3)


def test_perfect_and_disjoint() -> None:
    mask = np.array([[0, 1], [2, 1]])
    assert mean_iou(confusion_matrix(mask, mask)) == 1.0
    assert pixel_accuracy(confusion_matrix(mask, mask)) == 1.0
    wrong = (mask + 1) % 3
    assert mean_iou(confusion_matrix(mask, wrong)) == 0.0


def test_absent_class_is_left_out_of_the_mean() -> None:
    true = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    ious = per_class_iou(confusion_matrix(true, pred))
    assert ious[:2] == pytest.approx([1 / 2, 2 / 3])
    assert math.isnan(ious[2])
    assert mean_iou(confusion_matrix(true, pred)) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_matrices_add_up_and_summary() -> None:
    a, b = np.array([0, 1, 2]), np.array([0, 2, 2])
    cm = confusion_matrix(a, b) + confusion_matrix(b, a)
    assert cm.sum() == 6
    summary = summarize(cm)
    assert summary["pixels"] == 6
    assert set(summary["per_class_iou"]) == {"pet", "background", "border"}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape mismatch"):
        confusion_matrix(a, b[:2])


def test_a_class_with_no_iou_is_null_in_the_summary_json() -> None:
    """An evaluation set without border pixels, and a model that never predicts border: its IoU
    is NaN, which json.dumps wrote as a bare NaN and Postgres' json refused with the run."""
    import json

    true = np.array([0, 0, 1, 1])
    summary = summarize(confusion_matrix(true, true))
    assert summary["per_class_iou"] == {"pet": 1.0, "background": 1.0, "border": None}
    json.dumps(summary, allow_nan=False)  # valid JSON
