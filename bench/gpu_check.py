"""GPU check of the shipped U-Net: agreement with CPU float32 Keras, and speed per batch size.

Runs where TensorFlow is absent but JAX sees a GPU (Keras 3 on its JAX backend loads the same
`.keras` file), as a proxy for the TF/XLA GPU worker. Needs `.devcheck/ref.npz` with `x` (model
inputs) and `logits` (CPU float32 Keras outputs) made beside it; writes `$OUT/gpu_check.json`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

os.environ["KERAS_BACKEND"] = "jax"

import jax
import jax.numpy as jnp
import keras
import numpy as np

model = keras.models.load_model("models/baseline.keras", compile=False)
TV = [v.value for v in model.trainable_variables]
NTV = [v.value for v in model.non_trainable_variables]


def forward(tv: list[Any], ntv: list[Any], x: Any) -> Any:
    y, _ = model.stateless_call(tv, ntv, x, training=False)
    return y.astype(jnp.float32)


FN = jax.jit(forward)


def cast(values: list[Any], dtype: Any) -> list[Any]:
    """Floating variables in `dtype`, others unchanged."""
    return [v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for v in values]


def agreement(x: np.ndarray, ref: np.ndarray, dtype: Any) -> tuple[float, float]:
    """Share of argmax pixels equal to the reference, and the largest logit difference."""
    y = np.asarray(FN(cast(TV, dtype), cast(NTV, dtype), jnp.asarray(x, dtype)))
    return float((y.argmax(-1) == ref.argmax(-1)).mean()), float(np.abs(y - ref).max())


def speed(dtype: Any, name: str) -> dict[str, dict[str, float]]:
    """Images/s for each batch size (median of a timed loop after a warm-up)."""
    tv, ntv, out = cast(TV, dtype), cast(NTV, dtype), {}
    for bs in (1, 8, 32, 128, 512):
        xb = jnp.asarray(np.random.rand(bs, 128, 128, 3), dtype)
        FN(tv, ntv, xb).block_until_ready()
        n = max(5, 2048 // bs)
        start = time.perf_counter()
        for _ in range(n):
            y = FN(tv, ntv, xb)
        y.block_until_ready()
        seconds = (time.perf_counter() - start) / n
        out[f"{name}_b{bs}"] = {"ms_per_batch": seconds * 1e3, "images_per_s": bs / seconds}
        print(name, bs, f"{bs / seconds:.0f} img/s", f"{seconds * 1e3:.2f} ms", flush=True)
    return out


def main() -> None:
    ref = np.load(".devcheck/ref.npz")
    result: dict[str, Any] = {
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "keras": keras.__version__,
        "speed": {},
    }
    for name, dtype in (
        ("float32", jnp.float32),
        ("bfloat16", jnp.bfloat16),
        ("float16", jnp.float16),
    ):
        agree, maxabs = agreement(ref["x"], ref["logits"], dtype)
        result[f"agreement_{name}"], result[f"maxabs_{name}"] = agree, maxabs
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        result["speed"].update(speed(dtype, name))
    print(json.dumps(result, indent=1))
    Path(os.environ.get("OUT", "."), "gpu_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
