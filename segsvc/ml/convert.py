"""Convert a `.keras` model to serving artifacts (ONNX, LiteRT) once per model version.

Artifacts live at `<artifact_dir>/<model sha256>/<kind>-<converter fingerprint>/<file>`: the
fingerprint hashes the converters' versions and the recipe (opset, quantization), so upgrading
TensorFlow, tf2onnx or LiteRT converts again instead of serving an old artifact from a
persistent cache. Each file is written to a temporary name, fsynced and renamed into place,
under a file lock, so two workers starting together convert once and never see a half-written
file. Conversion imports TensorFlow, so by default it runs in a child process (killed after
`CONVERT_TIMEOUT_S`): the serving process keeps no TensorFlow memory. Every load marks the
folder used (its mtime), which is what `segsvc.ml.artifact_cache` prunes by.

A folder is named by a sha256, so a conversion converts only bytes with that sha256: it reads
the model file once, hashes those bytes and converts them (not the path, which may hold other
weights by then), refusing with `ModelFileMismatchError` otherwise. The cache then never holds,
under a version's sha256, the conversion of another file that was at its path for a while.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from segsvc.digest import file_sha256
from segsvc.files import write_atomically

log = logging.getLogger(__name__)

ONNX_OPSET = 17
LITERT_KINDS = ("litert", "litert-fp16", "litert-int8")
CONVERTED_KINDS = ("onnx", *LITERT_KINDS)
# What each kind's conversion does: part of the cache key, so change it (or RECIPE_VERSION)
# whenever `_to_onnx` / `_to_litert` start producing something else.
RECIPE_VERSION = 1
RECIPES = {
    "onnx": f"tf2onnx from_function, opset {ONNX_OPSET}, dynamic batch",
    "litert": "frozen concrete function, float32, fixed batch",
    "litert-fp16": "frozen concrete function, Optimize.DEFAULT, float16 weights, fixed batch",
    "litert-int8": "frozen concrete function, Optimize.DEFAULT (dynamic-range int8), fixed batch",
}
# Distributions whose versions can change an artifact (its bytes, or whether it loads).
CONVERTERS = {
    "onnx": ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx"),
    **dict.fromkeys(LITERT_KINDS, ("tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert")),
}
# A conversion takes 6-26 s (docs/scaling.md); one still running after this is hung. It holds
# the folder's file lock and the worker's model lock, so without a limit every later refresh
# (a rollback included) would wait behind it for ever.
CONVERT_TIMEOUT_S = 15 * 60.0
# The conversion child's exit status when the model file is not the one its folder names.
MISMATCH_EXIT = 65
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ModelFileMismatchError(RuntimeError):
    """A model file is missing, or its bytes are not those its version's sha256 names (the
    file was replaced at its path): its weights must not serve, or be converted, as that
    version."""


def check_model_file(path: str | Path, sha256: str) -> None:
    """Raise `ModelFileMismatchError` unless the file at `path` has this sha256."""
    try:
        found = file_sha256(path)
    except FileNotFoundError:
        raise ModelFileMismatchError(
            f"model file {path} is missing (expected sha256 {sha256})"
        ) from None
    if found != sha256:
        raise ModelFileMismatchError(_mismatch(path, sha256, found))


def _mismatch(path: str | Path, expected: str, found: str) -> str:
    return (
        f"model file {path} has sha256 {found}, not the registered {expected}: it was "
        "replaced at its path after registration; register the new file as a new version "
        "(or put the registered file back)"
    )


class ConversionError(RuntimeError):
    """A model could not be converted. `deterministic`: it failed twice with the same error,
    so the artifact cannot be built from this model file (not a passing failure)."""

    def __init__(self, message: str, *, deterministic: bool) -> None:
        super().__init__(message)
        self.deterministic = deterministic


def converter_fingerprint(kind: str, installed: Mapping[str, str] | None = None) -> str:
    """A short hash of what builds `kind`'s artifacts: converter versions and recipe. The
    versions are this process's, or those of `installed` (distribution -> version, e.g. an
    image's pinned requirements)."""
    versions: dict[str, str | None] = {}
    for dist in CONVERTERS[kind]:
        if installed is not None:
            versions[dist] = installed.get(dist)
            continue
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    key = {"recipe": RECIPES[kind], "recipe_version": RECIPE_VERSION, "versions": versions}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def artifact_folder(artifact_dir: Path, sha256: str, kind: str) -> Path:
    """Where `kind`'s artifacts of the model with this sha256 live, for these converters."""
    return artifact_dir / sha256 / f"{kind}-{converter_fingerprint(kind)}"


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
    folder = artifact_folder(artifact_dir, sha256 or file_sha256(model_path), kind)
    wanted = artifact_files(kind, batch_sizes)
    mark_used(folder)  # first: a pruner deciding meanwhile keeps it (or puts it back)
    if all((folder / name).is_file() for name in wanted):
        return folder
    with _locked(folder / ".lock"):
        missing = [name for name in wanted if not (folder / name).is_file()]
        if missing:
            log.info("converting %s to %s: %s", model_path, kind, missing)
            if in_subprocess:
                _convert_in_child(Path(model_path), kind, folder, missing)
            else:
                convert_files(Path(model_path), kind, folder, missing, sha256=folder.parent.name)
    return folder


def mark_used(folder: Path) -> None:
    """Record that a worker uses `folder` now (its mtime): the cache keeps what is used."""
    with suppress(OSError):  # not converted yet, or a read-only cache that no one prunes
        os.utime(folder)


def artifact_identities(folder: Path, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each of `names` present in `folder`: which file a runtime opened."""
    found = {}
    for name in names:
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            continue
        found[name] = (st.st_ino, st.st_mtime_ns)
    return found


def set_aside(folder: Path, identities: dict[str, tuple[int, int]]) -> list[str]:
    """Move cached artifacts that failed to load out of the way (kept for a post-mortem as
    `.<name>.broken-<time>`), so the next `ensure_artifacts` converts them again. A file
    another worker has already replaced (another identity) stays."""
    moved = []
    lock = folder / ".lock"
    with _locked(lock):
        # Stamped on the clock the pruner compares with (`artifact_cache._filesystem_now`): on a
        # shared volume the file server's; a host's own clock days behind or ahead would have a
        # pruner delete the file at once, or keep it for days past its grace period.
        os.utime(lock)
        stamp = lock.stat().st_mtime_ns
        for name, identity in artifact_identities(folder, list(identities)).items():
            if identity == identities[name]:
                os.replace(folder / name, folder / f".{name}.broken-{stamp}")
                moved.append(name)
    return moved


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the lock file `path`, making its folder if needed. A pruner deletes a folder by
    renaming it aside under this lock, so a lock won after waiting may be the file of a folder
    that is gone: then the folder is made anew and its own lock taken, and a conversion never
    writes into a folder whose path holds no lock (where a pruner would see nothing busy)."""
    for _ in range(100):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+b")  # noqa: SIM115 (a `with` below, once it opened)
        except FileNotFoundError:  # the folder (or its model's) was pruned in between
            continue
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if _is_at(fh.fileno(), path):
                    yield
                    return
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    raise RuntimeError(f"could not lock {path}: its folder keeps being deleted")


def _is_at(fd: int, path: Path) -> bool:
    """True when the open file `fd` is the one at `path` (not one renamed or deleted since)."""
    try:
        here = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (here.st_dev, here.st_ino)


# Errors of the machine, not of the model: they repeat word for word while the condition lasts
# (a full disk, memory taken by something else), so they never make a failure deterministic.
RESOURCE_ERRORS = (
    "MemoryError",
    "ResourceExhausted",
    "OSError",
    "IOError",
    "No space left on device",
    "Cannot allocate memory",
    "Disk quota exceeded",
)


def _convert_in_child(model: Path, kind: str, folder: Path, names: list[str]) -> None:
    """Convert in a child process; a failure with a Python error is tried once more at once,
    and the same error twice makes the `ConversionError` deterministic. A hung child (killed
    after `CONVERT_TIMEOUT_S`) or one killed by a signal (the OOM killer) is not retried here:
    that failure may be passing, and the caller retries later."""
    first = _run_child(model, kind, folder, names)
    if first is None:
        return
    message, signature = first
    if signature is None:
        raise ConversionError(message, deterministic=False)
    log.warning("converting %s to %s failed (%s); trying once more", model, kind, signature)
    second = _run_child(model, kind, folder, names)
    if second is None:
        return
    # Out of memory or disk, the same line twice proves nothing about the model.
    resource = any(mark in signature for mark in RESOURCE_ERRORS)
    raise ConversionError(second[0], deterministic=second[1] == signature and not resource)


# The conversion child's private copy of the model (see `_verified_copy`), in the artifact
# folder whose lock the parent holds; a child killed (timeout, OOM) leaves it, so the parent
# removes it.
SCRATCH = ".source"


def _run_child(
    model: Path, kind: str, folder: Path, names: list[str]
) -> tuple[str, str | None] | None:
    """None on success, else (message, the error's last line or None for a kill/timeout)."""
    cmd = _child_command(model, kind, folder, names)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    try:
        out = subprocess.run(  # noqa: S603
            cmd, capture_output=True, text=True, env=env, check=False, timeout=CONVERT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:  # run() has killed and reaped the child
        shutil.rmtree(folder / SCRATCH, ignore_errors=True)  # its model copy (tens of MB)
        return (
            f"converting {model} to {kind} timed out after {CONVERT_TIMEOUT_S:.0f}s; "
            "the conversion process was killed",
            None,
        )
    if out.returncode == 0:
        return None
    if out.returncode == MISMATCH_EXIT:  # not a conversion failure: never tried again here
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"{model}: sha256 mismatch"
        raise ModelFileMismatchError(last.removeprefix("ModelFileMismatchError: "))
    message = f"converting {model} to {kind} failed:\n{out.stderr[-3000:]}"
    if out.returncode < 0:  # killed by a signal: SIGKILL is usually the OOM killer
        shutil.rmtree(folder / SCRATCH, ignore_errors=True)  # its model copy, left behind
        return f"{message}\n(killed by signal {-out.returncode})", None
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    return message, lines[-1] if lines else f"exit status {out.returncode}"


def _child_command(model: Path, kind: str, folder: Path, names: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "segsvc.ml.convert",
        "--model",
        str(model),
        "--kind",
        kind,
        "--out",
        str(folder),
        "--sha256",
        folder.parent.name,  # `artifact_folder`'s layout: <artifact_dir>/<sha256>/<kind>-<fp>
        *names,
    ]


def convert_files(
    model_path: Path,
    kind: str,
    folder: Path,
    names: Sequence[str],
    *,
    sha256: str | None = None,
) -> None:
    """Convert in this process (imports TensorFlow); each file lands atomically. With `sha256`,
    the bytes converted are those hashed (`ModelFileMismatchError` if they have another)."""
    folder.mkdir(parents=True, exist_ok=True)
    if sha256 is None:
        model = _load_keras(model_path)
    else:
        # In the folder (whose lock the caller holds), at a fixed path: an error that names
        # the copy reads the same on a second try, as `_convert_in_child` compares them.
        scratch = folder / SCRATCH
        try:
            model = _load_keras(_verified_copy(model_path, sha256, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    for name in names:
        data = _to_onnx(model) if kind == "onnx" else _to_litert(model, kind, _batch_of(name))
        # After a crash or power loss the cache holds the whole file or none.
        write_atomically(folder / name, data, sync_folder=True)


def _load_keras(path: Path) -> Any:
    from segsvc.ml.unet import load_model

    return load_model(path)


def _verified_copy(model_path: Path, sha256: str, scratch: Path) -> Path:
    """A private copy of `model_path`, written from the very bytes that were hashed: a file
    replaced at the path meanwhile is never what gets converted."""
    if not SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    try:
        data = Path(model_path).read_bytes()  # a model is tens of MB
    except FileNotFoundError:
        raise ModelFileMismatchError(
            f"model file {model_path} is missing (expected sha256 {sha256})"
        ) from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ModelFileMismatchError(_mismatch(model_path, sha256, found))
    shutil.rmtree(scratch, ignore_errors=True)  # left by a killed conversion
    scratch.mkdir()
    copy = scratch / Path(model_path).name
    copy.write_bytes(data)
    return copy


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
    parser.add_argument("--sha256", default=None, help="Refuse a model file with another.")
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    try:
        convert_files(args.model, args.kind, args.out, args.names, sha256=args.sha256)
    except ModelFileMismatchError as exc:
        print(f"ModelFileMismatchError: {exc}", file=sys.stderr)  # noqa: T201 (for the parent)
        raise SystemExit(MISMATCH_EXIT) from None


if __name__ == "__main__":
    main()
