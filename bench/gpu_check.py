"""GPU check of the shipped U-Net (Keras 3 on JAX/XLA): agreement with CPU float32 and speed."""
import json, os, sys, time
os.environ["KERAS_BACKEND"] = "jax"
import numpy as np
import jax, jax.numpy as jnp
import keras

out = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "keras": keras.__version__}
model = keras.models.load_model("models/baseline.keras", compile=False)
tv = [v.value for v in model.trainable_variables]
ntv = [v.value for v in model.non_trainable_variables]

def run(tv, ntv, x):
    y, _ = model.stateless_call(tv, ntv, x, training=False)
    return y.astype(jnp.float32)
fn = jax.jit(run)
ref = np.load(".devcheck/ref.npz")
x, ref_logits = ref["x"], ref["logits"]
def agree(dtype):
    cast = lambda vs: [v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for v in vs]
    y = np.asarray(fn(cast(tv), cast(ntv), jnp.asarray(x, dtype)))
    return float((y.argmax(-1) == ref_logits.argmax(-1)).mean()), float(np.abs(y - ref_logits).max())
for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("float16", jnp.float16)):
    out[f"agreement_{name}"], out[f"maxabs_{name}"] = agree(dt)
speed = {}
for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    cast = lambda vs: [v.astype(dt) if jnp.issubdtype(v.dtype, jnp.floating) else v for v in vs]
    ctv, cntv = cast(tv), cast(ntv)
    for bs in (1, 8, 32, 128, 512):
        xb = jnp.asarray(np.random.rand(bs, 128, 128, 3), dt)
        fn(ctv, cntv, xb).block_until_ready()
        n = max(5, 2048 // bs)
        t = time.perf_counter()
        for _ in range(n):
            y = fn(ctv, cntv, xb)
        y.block_until_ready()
        dt_s = (time.perf_counter() - t) / n
        speed[f"{name}_b{bs}"] = {"ms_per_batch": dt_s * 1e3, "images_per_s": bs / dt_s}
        print(name, bs, f"{bs/dt_s:.0f} img/s", f"{dt_s*1e3:.2f} ms", flush=True)
out["speed"] = speed
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "gpu_check.json"), "w"), indent=1)
