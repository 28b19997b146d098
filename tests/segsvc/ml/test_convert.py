"""Artifact conversion: keyed by the model's sha256, converted once, written atomically."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from segsvc.digest import file_sha256
from segsvc.ml import convert
from segsvc.ml.convert import ConversionError, artifact_folder, ensure_artifacts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_ensure_artifacts_keys_by_sha256_and_converts_once(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ensure_artifacts(model_file, kind="onnx", artifact_dir=tmp_path)
    assert folder == artifact_folder(tmp_path, file_sha256(model_file), "onnx")
    assert folder.parent == tmp_path / file_sha256(model_file)
    assert folder.name.startswith("onnx-")
    assert (folder / "model.onnx").stat().st_size > 1_000_000
    assert not list(folder.glob("*.tmp"))

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("converted a cached artifact again")

    monkeypatch.setattr(convert, "_convert_in_child", refuse)
    monkeypatch.setattr(convert, "convert_files", refuse)
    assert ensure_artifacts(model_file, kind="onnx", artifact_dir=tmp_path) == folder


def test_ensure_artifacts_adds_only_missing_batch_sizes(model_file: Path, tmp_path: Path) -> None:
    sha = file_sha256(model_file)
    folder = ensure_artifacts(
        model_file,
        kind="litert",
        artifact_dir=tmp_path,
        sha256=sha,
        batch_sizes=(1,),
        in_subprocess=False,
    )
    first = (folder / "b1.tflite").stat().st_mtime_ns
    ensure_artifacts(
        model_file,
        kind="litert",
        artifact_dir=tmp_path,
        sha256=sha,
        batch_sizes=(1, 2),
        in_subprocess=False,
    )
    assert (folder / "b1.tflite").stat().st_mtime_ns == first
    assert (folder / "b2.tflite").is_file()


def test_ensure_artifacts_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a model")
    with pytest.raises(ConversionError, match="converting") as failed:
        ensure_artifacts(broken, kind="onnx", artifact_dir=tmp_path / "cache")
    assert failed.value.deterministic  # the same error twice: the file cannot be converted
    assert not list((tmp_path / "cache").rglob("*.onnx"))


def test_artifact_files_rejects_unconverted_kinds() -> None:
    with pytest.raises(ValueError, match="keras"):
        convert.artifact_files("keras", (1,))


SHA = "ab" * 32


def fake_conversions(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the conversion child with one that writes placeholder files; returns the calls."""
    calls: list[list[str]] = []

    def convert_in_child(model: Path, kind: str, folder: Path, names: list[str]) -> None:
        calls.append(names)
        for name in names:
            (folder / name).write_bytes(b"artifact")

    monkeypatch.setattr(convert, "_convert_in_child", convert_in_child)
    return calls


def test_upgrading_a_converter_converts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache outlives the image: an upgraded tf2onnx must not serve the old artifact."""
    calls = fake_conversions(monkeypatch)
    real_version = convert.importlib.metadata.version
    folder = ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=SHA)
    assert (
        ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=SHA)
        == folder
    )
    assert len(calls) == 1

    def upgraded(dist: str) -> str:
        return "99.0" if dist == "tf2onnx" else real_version(dist)

    monkeypatch.setattr(convert.importlib.metadata, "version", upgraded)
    again = ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=SHA)
    assert again != folder
    assert again.parent == folder.parent
    assert len(calls) == 2
    # LiteRT artifacts do not depend on tf2onnx...
    assert artifact_folder(tmp_path, SHA, "litert") == folder.parent / (
        "litert-" + convert.converter_fingerprint("litert")
    )
    # ...but a new quantization recipe is a new key too.
    before = convert.converter_fingerprint("litert-int8")
    monkeypatch.setitem(convert.RECIPES, "litert-int8", "static int8")
    assert convert.converter_fingerprint("litert-int8") != before
    monkeypatch.setattr(convert, "RECIPE_VERSION", convert.RECIPE_VERSION + 1)
    assert convert.converter_fingerprint("onnx") != again.name.removeprefix("onnx-")


def test_converted_files_are_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segsvc.ml.unet

    events: list[str] = []
    real_fsync, real_replace = convert.os.fsync, convert.os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append("replace")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(segsvc.ml.unet, "load_model", lambda path: object())
    monkeypatch.setattr(convert, "_to_onnx", lambda model: b"onnx bytes")
    monkeypatch.setattr(convert.os, "fsync", fsync)
    monkeypatch.setattr(convert.os, "replace", replace)
    convert.convert_files(tmp_path / "m.keras", "onnx", tmp_path / "out", ["model.onnx"])
    assert events == ["fsync", "replace", "fsync"]  # the file, then the folder's entry
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"onnx bytes"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.onnx"]


def child(monkeypatch: pytest.MonkeyPatch, code: str, *args: str) -> None:
    """Make the conversion child run `code` (with `args` in sys.argv[1:])."""
    monkeypatch.setattr(convert, "_child_command", lambda *_: [sys.executable, "-c", code, *args])


def test_a_hung_conversion_is_killed_and_frees_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    child(
        monkeypatch,
        "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)",
        str(pid_file),
    )
    monkeypatch.setattr(convert, "CONVERT_TIMEOUT_S", 2.0)
    started = time.monotonic()
    with pytest.raises(ConversionError, match="timed out after 2s") as failed:
        ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=SHA)
    assert time.monotonic() - started < 30  # one try: a hang is not retried at once
    assert not failed.value.deterministic  # it may pass: the caller retries later
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped
    calls = fake_conversions(monkeypatch)  # the lock is free: the next try converts
    ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=SHA)
    assert calls == [["model.onnx"]]


@pytest.mark.parametrize("timeout", [False, True])
def test_a_killed_conversion_leaves_no_model_copy_in_the_cache(
    timeout: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child copies the model into the artifact folder (`.source`) and removes it when
    done; killed by the OOM killer or the timeout, it cannot: the parent does."""
    folder = artifact_folder(tmp_path, SHA, "onnx")
    scratch = folder / convert.SCRATCH
    end = "time.sleep(600)" if timeout else "os.kill(os.getpid(), signal.SIGKILL)"
    child(
        monkeypatch,
        "import os, signal, sys, time; p = os.path.join(sys.argv[1], 'm.keras'); "
        f"os.makedirs(sys.argv[1], exist_ok=True); open(p, 'wb').write(b'x' * 1000); {end}",
        str(scratch),
    )
    monkeypatch.setattr(convert, "CONVERT_TIMEOUT_S", 2.0)
    with pytest.raises(ConversionError):
        ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=SHA)
    assert not scratch.exists()


@pytest.mark.parametrize(
    ("code", "runs", "deterministic"),
    [
        ("raise ValueError('not a model')", 2, True),  # the same error twice
        ("import time; raise ValueError(time.time_ns())", 2, False),  # two different errors
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 1, False),  # OOM killer
        # Regression: a full disk or a MemoryError repeats word for word, and rejected the
        # canary fleet-wide at once though the docs call it passing.
        ("raise OSError(28, 'No space left on device')", 2, False),
        ("raise MemoryError()", 2, False),
    ],
)
def test_a_failed_conversion_is_deterministic_only_when_it_fails_alike_twice(
    code: str, runs: int, deterministic: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "runs"
    child(monkeypatch, f"open({str(log)!r}, 'a').write('x'); {code}")
    with pytest.raises(ConversionError, match="converting") as failed:
        ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=SHA)
    assert failed.value.deterministic is deterministic
    assert log.read_text() == "x" * runs


def test_a_conversion_that_passes_on_its_second_try_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "runs"
    code = (
        "import os, sys; tries = open(sys.argv[1], 'a+'); tries.write('x'); tries.seek(0)\n"
        "if len(tries.read()) == 1: raise MemoryError('first try')\n"
        "open(os.path.join(sys.argv[2], 'model.onnx'), 'wb').write(b'ok')"
    )
    folder = artifact_folder(tmp_path, SHA, "onnx")
    child(monkeypatch, code, str(log), str(folder))
    assert (
        ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=SHA)
        == folder
    )
    assert (folder / "model.onnx").read_bytes() == b"ok"


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Net with other weights, as a `git pull` or `segsvc train --out` puts at a path."""
    from segsvc.ml.unet import build_unet

    path = tmp_path_factory.mktemp("other") / "other.keras"
    build_unet().save(path)
    return path


@pytest.mark.parametrize("in_subprocess", [True, False])
def test_a_conversion_refuses_bytes_other_than_its_sha256_names(
    model_file: Path, other_weights: Path, tmp_path: Path, in_subprocess: bool
) -> None:
    from segsvc.ml.convert import ModelFileMismatchError

    path = tmp_path / "baseline.keras"
    path.write_bytes(other_weights.read_bytes())  # the registered file was replaced
    registered = file_sha256(model_file)
    started = time.monotonic()
    with pytest.raises(ModelFileMismatchError, match=f"not the registered {registered}"):
        ensure_artifacts(
            path,
            kind="onnx",
            artifact_dir=tmp_path / "cache",
            sha256=registered,
            in_subprocess=in_subprocess,
        )
    assert time.monotonic() - started < 60  # refused before converting, and not retried
    assert not list((tmp_path / "cache").rglob("*.onnx"))


def test_a_cached_conversion_under_a_sha256_is_of_the_file_with_that_sha256(
    model_file: Path, other_weights: Path, tmp_path: Path
) -> None:
    import numpy as np

    from segsvc.ml.convert import ModelFileMismatchError
    from segsvc.ml.runtime import KerasRuntime, load_runtime

    path = tmp_path / "baseline.keras"
    registered = file_sha256(model_file)  # the registry's sha256 of the version
    path.write_bytes(other_weights.read_bytes())  # for a while the path holds other weights
    cache = tmp_path / "artifacts"
    with pytest.raises(ModelFileMismatchError):  # a worker loads the version meanwhile
        load_runtime(path, kind="onnx", sha256=registered, artifact_dir=cache)
    path.write_bytes(model_file.read_bytes())  # the registered file is back
    served = load_runtime(path, kind="onnx", sha256=registered, artifact_dir=cache)
    x = np.random.default_rng(0).random((2, 128, 128, 3), dtype=np.float32)
    np.testing.assert_allclose(served.predict(x), KerasRuntime(path).predict(x), atol=1e-3)
