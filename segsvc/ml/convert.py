"""Convert a `.keras` model to serving artifacts (ONNX, LiteRT) once per model version.

Artifacts live at `<artifact_dir>/<model sha256>/<kind>/<file>`. Each file is written to a
temporary name and renamed into place, under a file lock, so two workers starting together
convert once and never see a half-written file. Conversion imports TensorFlow, so by default it
runs in a child process: the serving process keeps no TensorFlow memory.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segsvc.digest import file_sha256

log = logging.getLogger(__name__)

ONNX_OPSET = 17
LITERT_KINDS = ("litert", "litert-fp16", "litert-int8")
CONVERTED_KINDS = ("onnx", *LITERT_KINDS)


def artifact_files(kind: str, batch_sizes: Sequence[int]) -> list[str]:
    """File names a runtime needs: one ONNX graph (dynamic batch), or one LiteRT per batch size.

    LiteRT gets fixed batch sizes because with a dynamic batch dimension its transposed
    convolutions fall out of XNNPACK and the model runs about 2x slower.
    """
    if kind == "onnx":
        return ["model.onnx"]
    if kind in LITERT_KINDS:
        return [f"b{n}.tflite" for n in sorted(set(batch_sizes))]
    raise ValueError(f"{kind!r} has no converted artifact")


def ensure_artifacts(
    model_path: str | Path,
    *,
    kind: str,
    artifact_dir: Path,
    sha256: str | None = None,
    batch_sizes: Sequence[int] = (1,),
    in_subprocess: bool = True,
) -> Path:
    """The folder holding `kind`'s artifacts for this model, converting what is missing."""
    folder = artifact_dir / (sha256 or file_sha256(model_path)) / kind
    wanted = artifact_files(kind, batch_sizes)
    if all((folder / name).is_file() for name in wanted):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        missing = [name for name in wanted if not (folder / name).is_file()]
        if missing:
            log.info("converting %s to %s: %s", model_path, kind, missing)
            if in_subprocess:
                _convert_in_child(Path(model_path), kind, folder, missing)
            else:
                convert_files(Path(model_path), kind, folder, missing)
    return folder


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_in_child(model: Path, kind: str, folder: Path, names: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "segsvc.ml.convert",
        "--model",
        str(model),
        "--kind",
        kind,
        "--out",
        str(folder),
        *names,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # noqa: S603
    if out.returncode != 0:
        raise RuntimeError(f"converting {model} to {kind} failed:\n{out.stderr[-3000:]}")


def convert_files(model_path: Path, kind: str, folder: Path, names: Sequence[str]) -> None:
    """Convert in this process (imports TensorFlow); each file lands atomically."""
    from segsvc.ml.unet import load_model

    model = load_model(model_path)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = _to_onnx(model) if kind == "onnx" else _to_litert(model, kind, _batch_of(name))
        tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)


def _batch_of(name: str) -> int:
    return int(name.removeprefix("b").removesuffix(".tflite"))


def _serving_fn(model: Any, batch: int | None) -> Any:
    import tensorflow as tf

    spec = tf.TensorSpec((batch, 128, 128, 3), tf.float32, name="image")
    return tf.function(lambda x: model(x, training=False), input_signature=[spec])


def _to_onnx(model: Any) -> bytes:
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(
        _serving_fn(model, None),
        input_signature=_serving_fn(model, None).input_signature,
        opset=ONNX_OPSET,
    )
    data: bytes = proto.SerializeToString()
    return data


def _to_litert(model: Any, kind: str, batch: int) -> bytes:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    # Freeze the weights into the graph: converting the function with live variables leaves
    # them as uninitialised resource variables in the flatbuffer.
    frozen = convert_variables_to_constants_v2(_serving_fn(model, batch).get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    if kind in ("litert-fp16", "litert-int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8: dynamic-range weights
    if kind == "litert-fp16":
        converter.target_spec.supported_types = [tf.float16]
    data: bytes = converter.convert()
    return data


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m segsvc.ml.convert --model M --kind K --out DIR FILE...` (the child process)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--kind", required=True, choices=CONVERTED_KINDS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    convert_files(args.model, args.kind, args.out, args.names)


if __name__ == "__main__":
    main()
