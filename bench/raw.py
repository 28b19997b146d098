"""Raw model speed per runtime (batch 1, 8, 32), the naive `model.predict` and faithfulness."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from segsvc.ml.runtime import KINDS, load_runtime, serving_batch_sizes

GFLOP_PER_IMAGE = 1.18
BATCHES = (1, 8, 32)
RUNTIMES = [k for k in KINDS if k != "auto"]


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best numpy float32 matmul rate: the machine's practical float32 peak."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b  # warm up BLAS threads
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_batches(runtime: Any, x: npt.NDArray[np.float32], budget_s: float) -> dict[str, Any]:
    """images/s and latency per batch size, each measured for about `budget_s` seconds."""
    out: dict[str, Any] = {}
    for b in BATCHES:
        batch = x[:b]
        runtime.predict(batch)  # warm-up (allocations, XLA compile for this shape)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline or len(times) < 3:
            times.append(_timed(lambda batch=batch: runtime.predict(batch)))
        med = float(np.median(times))
        out[f"b{b}"] = {
            "images_per_s": b / med,
            "latency_ms": med * 1000.0,
            "p95_ms": float(np.percentile(times, 95)) * 1000.0,
            "runs": len(times),
        }
    return out


def naive_predict_rate(model_path: Path, x: npt.NDArray[np.float32], budget_s: float) -> float:
    """images/s of Keras `model.predict` on one image at a time (the naive starting point)."""
    from segsvc.ml.unet import load_model

    model = load_model(model_path)
    model.predict(x[:1], verbose=0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s or n < 3:
        model.predict(x[n % len(x) : n % len(x) + 1], verbose=0)
        n += 1
    return n / (time.perf_counter() - start)


def run_raw(
    model_path: Path,
    *,
    artifact_dir: Path,
    sha256: str,
    images: npt.NDArray[np.float32],
    masks: npt.NDArray[np.uint8],
    budget_s: float,
    log: Any,
) -> dict[str, Any]:
    """Every runtime's speed and its masks' agreement with float32 Keras (and with the labels)."""
    from retrain.metrics import confusion_matrix, mean_iou

    x = np.concatenate([images] * (1 + 32 // max(1, len(images))))[:32]
    results: dict[str, Any] = {}
    reference: npt.NDArray[np.int64] | None = None
    for kind in RUNTIMES:
        log(f"raw: {kind}")
        start = time.perf_counter()
        runtime = load_runtime(
            model_path,
            kind=kind,
            artifact_dir=artifact_dir,
            sha256=sha256,
            batch_sizes=serving_batch_sizes(32),
        )
        load_s = time.perf_counter() - start
        pred = np.concatenate(
            [runtime.predict(images[i : i + 32]).argmax(-1) for i in range(0, len(images), 32)]
        )
        if reference is None:
            reference = pred  # keras (float32) comes first
        results[kind] = {
            "load_s": load_s,
            **time_batches(runtime, x, budget_s),
            "mask_agreement": float((pred == reference).mean()),
            "miou": mean_iou(confusion_matrix(masks, pred)),
        }
        del runtime
        gc.collect()
    keras_miou = results["keras"]["miou"]
    for r in results.values():
        r["miou_drop_points"] = (keras_miou - r["miou"]) * 100.0
        r["faithful"] = r["mask_agreement"] >= 0.995 and r["miou_drop_points"] <= 0.5
    return results
