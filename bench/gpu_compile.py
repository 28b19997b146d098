"""What the XLA runtime's batch buckets save on a GPU: compile time per unseen batch size.

XLA compiles once per input shape. Served as is, every batch size a micro-batch happens to have
(1 to `SEG_BATCH_MAX_SIZE`) is a compile on the model's path the first time it occurs; the XLA
runtime (`segsvc/ml/runtime.py`) pads each batch to a bucket (powers of two and the largest
size) and compiles those at load. This times, for the shipped U-Net on Keras 3's JAX backend
(a proxy for the TF/XLA GPU worker, as in `bench/gpu_check.py`): the first call of each batch
size (compile + run), a warm call of it, and the time to warm every bucket at load. Writes
`$OUT/gpu_compile.json`.
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

MAX_BATCH = 32
BUCKETS = (1, 2, 4, 8, 16, 32)
# Batch sizes timed one by one (`GPU_COMPILE_SIZES=1,7,32`; default all 1..MAX_BATCH).
SIZES = [int(n) for n in os.environ.get("GPU_COMPILE_SIZES", "").split(",") if n] or list(
    range(1, MAX_BATCH + 1)
)


def timed(fn: Any, *args: Any) -> float:
    """Seconds for one call, waiting for the device."""
    start = time.perf_counter()
    fn(*args).block_until_ready()
    return time.perf_counter() - start


def main() -> None:
    model = keras.models.load_model("models/baseline.keras", compile=False)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def forward(tv: list[Any], ntv: list[Any], x: Any) -> Any:
        y, _ = model.stateless_call(tv, ntv, x, training=False)
        return y

    rng = np.random.default_rng(0)
    sizes: dict[int, dict[str, float]] = {}
    fn = jax.jit(forward)  # one jitted function: a cache entry (a compile) per shape
    for n in SIZES:
        x = jnp.asarray(rng.random((n, 128, 128, 3), np.float32))
        first = timed(fn, tv, ntv, x)
        warm = min(timed(fn, tv, ntv, x) for _ in range(5))
        sizes[n] = {"first_call_s": first, "warm_call_ms": warm * 1e3}
        print(f"b{n}: first {first:.2f} s, warm {warm * 1e3:.2f} ms", flush=True)
    bucketed = jax.jit(forward)  # a fresh cache, as a worker loading the model
    start = time.perf_counter()
    for n in BUCKETS:
        timed(bucketed, tv, ntv, jnp.zeros((n, 128, 128, 3), jnp.float32))
    warm_buckets = time.perf_counter() - start
    print(f"warming buckets {BUCKETS}: {warm_buckets:.1f} s", flush=True)
    compiles = [s["first_call_s"] - s["warm_call_ms"] / 1e3 for s in sizes.values()]
    result = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "keras": keras.__version__,
        "per_size": sizes,
        "compile_s_median": float(np.median(compiles)),
        "compile_s_total_unbucketed": float(sum(compiles)),
        "buckets": list(BUCKETS),
        "warm_buckets_at_load_s": warm_buckets,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "per_size"}, indent=1))
    Path(os.environ.get("OUT", "."), "gpu_compile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
