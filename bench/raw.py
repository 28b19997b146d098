"""Raw model speed per runtime (batch 1, 8, 32), the naive `model.predict` and faithfulness."""

from __future__ import annotations

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


def blas_core() -> str | None:
    """The kernel set numpy's bundled OpenBLAS picked for this CPU (e.g. "Haswell": AVX2
    kernels, also on a CPU with AVX-512), or None if it cannot tell: the matmul rate is that
    kernel's, not necessarily the CPU's float32 peak."""
    import ctypes

    folder = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in sorted(folder.glob("libscipy_openblas*.so*")):
        try:
            handle = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename"):
            fn = getattr(handle, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                core = fn()
                return core.decode() if core else None
    return None


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(
    predictors: dict[str, Any],
    x: npt.NDArray[np.float32],
    budget_s: float,
    batches: tuple[int, ...] = BATCHES,
) -> dict[str, dict[str, Any]]:
    """images/s and latency per runtime and batch size, runtimes timed round-robin so that a
    change in the machine's load during the run hits all of them alike."""
    out: dict[str, dict[str, Any]] = {name: {} for name in predictors}
    for b in batches:
        batch = x[:b]
        for predict in predictors.values():
            predict(batch)  # warm-up (allocations, XLA compile for this shape)
        times: dict[str, list[float]] = {name: [] for name in predictors}
        deadline = time.perf_counter() + budget_s * len(predictors)
        while time.perf_counter() < deadline or min(len(t) for t in times.values()) < 3:
            for name, predict in predictors.items():
                times[name].append(_timed(lambda p=predict, xb=batch: p(xb)))
        for name, t in times.items():
            med = float(np.median(t))
            out[name][f"b{b}"] = {
                "images_per_s": b / med,
                "latency_ms": med * 1000.0,
                "p95_ms": float(np.percentile(t, 95)) * 1000.0,
                "runs": len(t),
            }
    return out


def naive_predictor(model_path: Path) -> Any:
    """Keras `model.predict` image by image (the naive starting point; never serve this)."""
    from segsvc.ml.unet import load_model

    model = load_model(model_path)

    def predict(batch: npt.NDArray[np.float32]) -> None:
        for i in range(len(batch)):
            model.predict(batch[i : i + 1], verbose=0)

    return predict


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
    from retrain.evaluate import is_faithful
    from retrain.metrics import confusion_matrix, mean_iou

    x = np.concatenate([images] * (1 + 32 // max(1, len(images))))[:32]
    results: dict[str, Any] = {}
    predictors: dict[str, Any] = {}
    reference: npt.NDArray[np.int64] | None = None
    for kind in RUNTIMES:
        log(f"raw: load and check {kind}")
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
        predictors[kind] = runtime.predict
        results[kind] = {
            "load_s": load_s,
            "mask_agreement": float((pred == reference).mean()),
            "miou": mean_iou(confusion_matrix(masks, pred)),
        }
    log("raw: timing every runtime, interleaved")
    for kind, timings in time_interleaved(predictors, x, budget_s).items():
        results[kind].update(timings)
    log("raw: naive model.predict, interleaved with onnx")
    both = {"naive": naive_predictor(model_path), "onnx": predictors["onnx"]}
    naive = time_interleaved(both, x, budget_s, batches=(1,))
    results["naive_predict_b1"] = naive["naive"]["b1"]["images_per_s"]
    keras_miou = results["keras"]["miou"]
    for r in (results[kind] for kind in RUNTIMES):
        r["miou_drop_points"] = (keras_miou - r["miou"]) * 100.0
        r["faithful"] = is_faithful(r["mask_agreement"], r["miou_drop_points"])
    return results


class ServedTimer:
    """The served runtime with the worker's thread count (the raw reference for the running
    system) and the same runtime on all cores, loaded once and timed interleaved whenever asked:
    before the system starts, and again beside each capacity burst, so that a ratio of the two
    compares numbers from the same minutes of this machine's drifting speed."""

    def __init__(
        self,
        model_path: Path,
        *,
        kind: str,
        threads: int,
        artifact_dir: Path,
        sha256: str,
        images: npt.NDArray[np.float32],
    ) -> None:
        self.kind, self.threads = kind, threads
        self.x = np.concatenate([images] * (1 + 32 // max(1, len(images))))[:32]
        self.runtimes = {
            name: load_runtime(
                model_path,
                kind=kind,
                threads=n,
                artifact_dir=artifact_dir,
                sha256=sha256,
                batch_sizes=serving_batch_sizes(32),
            )
            for name, n in (("served", threads), ("all_cores", 0))
        }

    def full(self, budget_s: float) -> dict[str, Any]:
        """Batch 1, 8 and 32, with the LiteRT planner's call times and plans."""
        timed = self._time(budget_s, BATCHES)
        out = {
            "kind": self.kind,
            "threads": self.threads,
            **timed["served"],
            "all_cores": timed["all_cores"],
        }
        planner = getattr(self.runtimes["served"], "planner", None)
        if planner is not None:  # LiteRT: the per-size call times it measured and its plans
            out["call_ms"] = {str(k): v * 1000.0 for k, v in sorted(planner.seconds.items())}
            out["plans"] = {f"b{n}": list(planner.plan(n)) for n in (1, 4, 8, 9, 32)}
        return out

    def batched(self, budget_s: float) -> dict[str, float]:
        """Best batched images/s (b8 or b32), as served and on all cores."""
        timed = self._time(budget_s, (8, 32))
        return {
            name: max(t["b8"]["images_per_s"], t["b32"]["images_per_s"])
            for name, t in timed.items()
        }

    def _time(self, budget_s: float, batches: tuple[int, ...]) -> dict[str, dict[str, Any]]:
        predictors = {name: rt.predict for name, rt in self.runtimes.items()}
        return time_interleaved(predictors, self.x, budget_s, batches)
