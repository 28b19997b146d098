"""Inference runtimes behind one interface: float32 NHWC batch in [0, 1] -> logits.

`keras` and `xla` import TensorFlow; `onnx` and `litert*` serve an artifact converted once per
model version (see `segsvc.ml.convert`) and never import TensorFlow when it is cached.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from segsvc.digest import file_sha256
from segsvc.ml import IMAGE_SIZE
from segsvc.ml.batchplan import BatchPlanner
from segsvc.ml.convert import (
    CONVERTED_KINDS,
    LITERT_KINDS,
    artifact_files,
    artifact_folder,
    artifact_identities,
    converter_fingerprint,
    ensure_artifacts,
    set_aside,
)

log = logging.getLogger(__name__)

KINDS = ("auto", "keras", "xla", "onnx", *LITERT_KINDS)
# What `auto` serves on a CPU: ONNX Runtime float32 is exact (the same function as Keras) and the
# fastest exact runtime in BENCHMARKS.md. A quantized runtime is faster still, but whether it is
# faithful (masks agree with float32 Keras on >= 99.5% of pixels, mIoU drop <= 0.5 points)
# depends on the weights, so `auto` uses one only for a version whose registry metrics list it
# under `faithful_runtimes` (measured on validation images, e.g. by `make bench`).
CPU_DEFAULT = "onnx"
CPU_FASTER = ("litert-int8",)


class Runtime(Protocol):
    """A loaded model that turns a batch of inputs into logits."""

    name: str

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(N, 128, 128, 3) float32 -> (N, 128, 128, 3) float32 logits."""
        ...


class KerasRuntime:
    """TensorFlow/Keras: `model(x, training=False)` in a `tf.function` with a dynamic batch.

    With `jit_compile` (XLA) every new input shape is a new compilation (seconds, on the
    serving path), so batches are padded to a few fixed sizes instead (`xla_buckets`), each
    traced and compiled once at load, and the outputs sliced back to the batch."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        jit_compile: bool = False,
        mixed_precision: bool = False,
        threads: int = 0,
        max_batch: int = 32,
    ) -> None:
        import tensorflow as tf

        from segsvc.ml.unet import load_model

        if threads:
            _set_tf_threads(tf, threads)
        self.name = "xla" if jit_compile else "keras"
        self._tf = tf
        self._model = load_model(model_path)
        if mixed_precision:
            self._model = _as_mixed_precision(self._model)
            self.name += "-mixed"
        self.buckets: tuple[int, ...] = ()
        if jit_compile:
            # No input signature: each bucket's fixed shape is its own trace and XLA program.
            self._fn = tf.function(
                lambda x: tf.cast(self._model(x, training=False), tf.float32), jit_compile=True
            )
            self.buckets = xla_buckets(max_batch)
            for size in self.buckets:  # compile now, not when a batch of this size comes
                self._fn(tf.zeros((size, IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32))
            return
        spec = tf.TensorSpec(shape=(None, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=tf.float32)
        self._fn = tf.function(
            lambda x: tf.cast(self._model(x, training=False), tf.float32),
            input_signature=[spec],
        )

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if not self.buckets:
            out = self._fn(self._tf.convert_to_tensor(batch))
            return np.asarray(out, dtype=np.float32)
        n, top = len(batch), self.buckets[-1]
        if n == 0:
            return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        outputs = []
        for start in range(0, n, top):
            chunk = np.asarray(batch[start : start + top], np.float32)
            size = next(b for b in self.buckets if b >= len(chunk))
            if size > len(chunk):  # pad with zero images: images never affect each other
                pad = np.zeros((size - len(chunk), *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, pad])
            out = self._fn(self._tf.convert_to_tensor(chunk))
            outputs.append(np.asarray(out, dtype=np.float32)[: min(top, n - start)])
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]


def xla_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes XLA compiles: powers of two below `max_batch`, and `max_batch` itself."""
    top = max(1, max_batch)
    return tuple(sorted({1 << i for i in range(top.bit_length()) if 1 << i < top} | {top}))


class OnnxRuntime:
    """ONNX Runtime on the CPU with a dynamic batch dimension."""

    def __init__(self, onnx_path: Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads  # 0: one per physical core
        options.inter_op_num_threads = 1
        # No busy-waiting between runs: spinning threads starve the worker's own consumer and
        # store threads (and anything sharing the cores); measured faster under contention.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.name = "onnx"
        self._session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        (out,) = self._session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})
        return np.asarray(out, dtype=np.float32)


class LiteRTRuntime:
    """LiteRT (TFLite) with XNNPACK: one interpreter per fixed batch size, every graph static so
    XNNPACK accelerates all of it. Each size is timed once at load; a batch then runs as the
    cheapest sequence of calls (`segsvc.ml.batchplan`), and only the sizes some plan uses are
    kept loaded."""

    def __init__(self, folder: Path, *, kind: str, batch_sizes: Sequence[int], threads: int = 0):
        self.name = kind
        self._folder = folder
        self._threads = threads or os.cpu_count() or 1
        self._lock = threading.Lock()  # interpreters are not thread-safe
        # Timed one at a time and freed, so that peak memory holds one unused size at most.
        self.seconds = {size: self._time(self._open(size), size) for size in set(batch_sizes)}
        self.planner = BatchPlanner(self.seconds)
        used = self.planner.used_sizes(max(self.seconds))
        self._interpreters: dict[int, Any] = {size: self._open(size) for size in used}
        log.info(
            "%s: ms per call by batch size %s; serving with sizes %s",
            kind,
            {size: round(secs * 1000, 1) for size, secs in sorted(self.seconds.items())},
            sorted(used),
        )

    def _open(self, size: int) -> Any:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(
            model_path=str(self._folder / f"b{size}.tflite"), num_threads=self._threads
        )
        interp.allocate_tensors()
        return interp

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        n = len(batch)
        if n == 0:
            return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        batch = np.ascontiguousarray(batch, np.float32)
        outputs, start = [], 0
        with self._lock:
            for size in self.planner.plan(n):
                chunk = batch[start : start + size]
                if not len(chunk):  # no plan holds a wholly padded call; never run one
                    break
                if len(chunk) < size:  # the last call is padded with zero images
                    chunk = np.concatenate(
                        [chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), np.float32)]
                    )
                outputs.append(self._run(self._interpreters[size], chunk)[: min(size, n - start)])
                start += size
        out = np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
        if len(out) != n:  # a plan that does not cover the batch must never pass silently
            raise RuntimeError(f"batch plan {self.planner.plan(n)} returned {len(out)} of {n}")
        return out

    def _time(self, interp: Any, size: int, repeats: int = 2) -> float:
        """Seconds per call at this size: the best of `repeats` after a warm-up call."""
        zeros = np.zeros((size, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        self._run(interp, zeros)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            self._run(interp, zeros)
            best = min(best, time.perf_counter() - started)
        return best

    @staticmethod
    def _run(interp: Any, chunk: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        interp.set_tensor(interp.get_input_details()[0]["index"], chunk)
        interp.invoke()
        out = interp.get_tensor(interp.get_output_details()[0]["index"])
        return np.array(out, dtype=np.float32)  # copy: the buffer is reused by the next invoke


def gpu_visible(dev: Path = Path("/dev")) -> bool:
    """True when an NVIDIA GPU is exposed to this process (checked without importing TF).

    Any `/dev/nvidia<N>`: a container gets a GPU under its host number, so a pod given a node's
    third GPU sees `/dev/nvidia2` and no `/dev/nvidia0` (and once served on the CPU)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if not (dev / "nvidiactl").exists():
        return False
    return any(p.name[len("nvidia") :].isdigit() for p in dev.glob("nvidia[0-9]*"))


@dataclass(frozen=True)
class FaithfulRuntimes:
    """What a model version's metrics say about its runtimes, as this process can use it."""

    trusted: tuple[str, ...]  # measured faithful, and built here as they were measured
    # Measured faithful with other converters (another TensorFlow or LiteRT, say): the artifact
    # this process builds is not the one measured, so `auto` does not serve it.
    stale: tuple[str, ...] = ()


def faithful_runtimes(metrics: Mapping[str, Any] | None) -> FaithfulRuntimes:
    """The runtimes a version's metrics list under `faithful_runtimes` that count here. A
    converted runtime counts when `runtime_agreement[kind]["converter"]` is this process's
    `converter_fingerprint(kind)` (the converters' versions and recipe that built the measured
    artifact), or when no fingerprint was recorded (versions measured before they were)."""
    metrics = metrics or {}
    agreement = metrics.get("runtime_agreement") or {}
    trusted: list[str] = []
    stale: list[str] = []
    for kind in map(str, metrics.get("faithful_runtimes") or ()):
        measured = (agreement.get(kind) or {}).get("converter")
        if kind in CONVERTED_KINDS and measured and measured != converter_fingerprint(kind):
            stale.append(kind)
        else:
            trusted.append(kind)
    return FaithfulRuntimes(tuple(trusted), tuple(stale))


def resolve_kind(kind: str, faithful: Sequence[str] = ()) -> str:
    """`auto` -> TF XLA (mixed precision) on a GPU, else the fastest CPU runtime measured
    faithful for this model version (`faithful`), else exact ONNX Runtime float32."""
    if kind != "auto":
        return kind
    if gpu_visible():
        return "xla-gpu"
    return next((k for k in CPU_FASTER if k in faithful), CPU_DEFAULT)


def load_runtime(
    model_path: str | Path,
    *,
    kind: str = "keras",
    threads: int = 0,
    sha256: str | None = None,
    artifact_dir: Path | None = None,
    batch_sizes: Sequence[int] | None = None,
    faithful: Sequence[str] = (),
) -> Runtime:
    """Load `model_path` with the named runtime (converting and caching the artifact if needed)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown runtime {kind!r}; choose one of {', '.join(KINDS)}")
    kind = resolve_kind(kind, faithful)
    if kind == "keras":
        return KerasRuntime(model_path, threads=threads)
    if kind in ("xla", "xla-gpu"):
        if batch_sizes is None:
            from segsvc.settings import get_settings

            batch_sizes = (get_settings().batch_max_size,)
        return KerasRuntime(
            model_path,
            jit_compile=True,
            mixed_precision=kind == "xla-gpu",
            threads=threads,
            max_batch=max(batch_sizes, default=1),
        )
    if artifact_dir is None or batch_sizes is None:
        from segsvc.settings import get_settings

        cfg = get_settings()
        artifact_dir = artifact_dir or cfg.artifact_dir
        batch_sizes = batch_sizes or serving_batch_sizes(cfg.batch_max_size)
    batch_sizes = tuple(sorted(set(batch_sizes) | {1}))  # LiteRT splits down to single images
    sha256 = sha256 or file_sha256(model_path)
    names = artifact_files(kind, batch_sizes)
    # Artifacts found in the cache (not converted by this call): if they fail to load (a file
    # damaged on disk, a converter that changed without a new fingerprint), they are moved
    # aside and converted once more rather than failing the same way on every later load.
    folder = artifact_folder(artifact_dir, sha256, kind)
    cached = artifact_identities(folder, names)
    folder = ensure_artifacts(
        model_path, kind=kind, artifact_dir=artifact_dir, sha256=sha256, batch_sizes=batch_sizes
    )
    try:
        return _open_converted(kind, folder, batch_sizes, threads)
    except HOST_ERRORS as exc:
        if not isinstance(exc, FileNotFoundError):
            raise  # the host's fault (memory, a library, a read): new files would fail the same
    except Exception:  # noqa: S110 - judged by the second try below
        pass
    # Opened once more before the files are judged: a pruner may have had the folder aside for
    # a moment (it puts back one in use), and the runtimes say a file is missing each in its
    # own way (ONNX Runtime's NoSuchFile, LiteRT's ValueError), so sound files were set aside
    # and converted again.
    folder = ensure_artifacts(
        model_path, kind=kind, artifact_dir=artifact_dir, sha256=sha256, batch_sizes=batch_sizes
    )
    try:
        return _open_converted(kind, folder, batch_sizes, threads)
    except HOST_ERRORS:
        raise
    except Exception as exc:
        if not cached or _failed_here(folder, cached):
            # Converted just now, here or by an earlier load in this process that could not
            # open them either: converting again would fail the same way, on every retry.
            _FAILED_CONVERSIONS[folder] = artifact_identities(folder, names)
            raise
        log.warning(
            "cached %s artifacts in %s failed to load (%r); converting again", kind, folder, exc
        )
        set_aside(folder, cached)  # leaves a file another worker has replaced meanwhile
    folder = ensure_artifacts(
        model_path, kind=kind, artifact_dir=artifact_dir, sha256=sha256, batch_sizes=batch_sizes
    )
    try:
        return _open_converted(kind, folder, batch_sizes, threads)
    except Exception:
        _FAILED_CONVERSIONS[folder] = artifact_identities(folder, names)
        raise


# Errors of the host rather than of the artifact files (no memory, a library missing from the
# image, a failed read): setting sound files aside and converting them again would not help.
HOST_ERRORS: tuple[type[BaseException], ...] = (MemoryError, ImportError, OSError)
# Per artifact folder, the files this process converted (or converted again) and then could not
# open: a later load that finds those very files raises at once instead of converting them again,
# which the model manager's retry of a broken version every few minutes would otherwise do each
# time (minutes of CPU, and another generation of set-aside files).
_FAILED_CONVERSIONS: dict[Path, dict[str, tuple[int, int]]] = {}


def _failed_here(folder: Path, cached: dict[str, tuple[int, int]]) -> bool:
    failed = _FAILED_CONVERSIONS.get(folder, {})
    return all(failed.get(name) == identity for name, identity in cached.items())


def _open_converted(kind: str, folder: Path, batch_sizes: Sequence[int], threads: int) -> Runtime:
    if kind == "onnx":
        return OnnxRuntime(folder / "model.onnx", threads=threads)
    return LiteRTRuntime(folder, kind=kind, batch_sizes=batch_sizes, threads=threads)


def serving_batch_sizes(batch_max_size: int) -> tuple[int, ...]:
    """Fixed LiteRT batch sizes to convert: 1 to 8 and the largest micro-batch.

    Where XNNPACK's cost per image jumps differs by CPU (see `segsvc.ml.batchplan`), so every
    small size is there for the planner to pick from; the sizes it never uses are freed at
    load. b16 was tried and gained nothing on either CPU measured.
    """
    top = max(1, batch_max_size)
    return tuple(sorted({size for size in range(1, 9) if size <= top} | {top}))


def _set_tf_threads(tf: Any, threads: int) -> None:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # already initialised in this process
        log.debug("TensorFlow threads already configured")


def _as_mixed_precision(model: Any) -> Any:
    """The same U-Net computing in float16 (float32 variables), for GPUs with tensor cores."""
    import keras

    from segsvc.ml.unet import build_unet

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        clone = build_unet()
        clone.set_weights(model.get_weights())
        return clone
    except ValueError:  # another architecture: serve it in float32
        log.warning("model does not match build_unet(); serving it in float32")
        return model
    finally:
        keras.mixed_precision.set_global_policy("float32")
