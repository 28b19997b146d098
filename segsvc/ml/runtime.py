"""Inference runtimes behind one interface: float32 NHWC batch in [0, 1] -> logits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """A loaded model that turns a batch of inputs into logits."""

    name: str

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(N, 128, 128, 3) float32 -> (N, 128, 128, 3) float32 logits."""
        ...


class KerasRuntime:
    """TensorFlow/Keras: `model(x, training=False)` in a `tf.function` with a dynamic batch."""

    def __init__(self, model_path: str | Path, *, jit_compile: bool = False) -> None:
        import tensorflow as tf

        from segsvc.ml.unet import load_model

        self.name = "xla" if jit_compile else "keras"
        self._tf = tf
        self._model = load_model(model_path)
        spec = tf.TensorSpec(shape=(None, 128, 128, 3), dtype=tf.float32)
        self._fn = tf.function(
            lambda x: self._model(x, training=False), input_signature=[spec],
            jit_compile=jit_compile,
        )

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = self._fn(self._tf.convert_to_tensor(batch))
        return np.asarray(out, dtype=np.float32)


def load_runtime(model_path: str | Path, *, kind: str = "keras", threads: int = 0) -> Runtime:
    """Load `model_path` with the named runtime."""
    if kind in ("keras", "auto"):
        return KerasRuntime(model_path)
    if kind == "xla":
        return KerasRuntime(model_path, jit_compile=True)
    raise ValueError(f"Unknown runtime {kind!r}")
