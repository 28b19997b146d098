"""segsvc/files.py: atomic writes and lock files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segsvc.files import try_lock, write_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    write_atomically(target, b"first", sync_folder=True)
    write_atomically(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]


def test_try_lock_answers_at_once_while_another_holder_has_it(tmp_path: Path) -> None:
    lock = tmp_path / ".prune.lock"
    with try_lock(lock) as first:
        assert first
        with try_lock(lock) as second:  # another open of the file: another holder
            assert not second
    with try_lock(lock) as again:
        assert again  # released
