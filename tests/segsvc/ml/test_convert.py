"""Artifact conversion: keyed by the model's sha256, converted once, written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from segsvc.digest import file_sha256
from segsvc.ml import convert
from segsvc.ml.convert import ensure_artifacts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_ensure_artifacts_keys_by_sha256_and_converts_once(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ensure_artifacts(model_file, kind="onnx", artifact_dir=tmp_path)
    assert folder == tmp_path / file_sha256(model_file) / "onnx"
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
    with pytest.raises(RuntimeError, match="converting"):
        ensure_artifacts(broken, kind="onnx", artifact_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.onnx"))


def test_artifact_files_rejects_unconverted_kinds() -> None:
    with pytest.raises(ValueError, match="keras"):
        convert.artifact_files("keras", (1,))
