"""Pruning the artifact cache: what no kept model serves from goes after the grace period, and
never a folder a worker converts into or has just loaded."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from segsvc.files import try_lock
from segsvc.ml import artifact_cache, convert
from segsvc.ml.artifact_cache import prune_artifacts
from segsvc.ml.convert import artifact_files, artifact_folder, ensure_artifacts

KEPT, OLD, NEW = "aa" * 32, "bb" * 32, "cc" * 32
DAY = 24 * 3600.0
GRACE = 3 * DAY


def age(path: Path, seconds: float) -> None:
    """Make `path` look last used `seconds` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def cached(cache: Path, sha: str, kind: str = "onnx", *, name: str | None = None) -> Path:
    """A converted folder (placeholder files), last used ten days ago."""
    folder = artifact_folder(cache, sha, kind) if name is None else cache / sha / name
    folder.mkdir(parents=True)
    for file in artifact_files(kind, (1, 2)):
        (folder / file).write_bytes(b"artifact")
    age(folder, 10 * DAY)
    return folder


def lock_is_held(folder: Path) -> bool:
    """True when someone holds `folder`'s lock file (tried from a file of our own)."""
    with open(folder / ".lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def test_prune_artifacts_removes_unkept_models_once_unused_for_the_grace_period(
    tmp_path: Path,
) -> None:
    kept, old, recent = cached(tmp_path, KEPT), cached(tmp_path, OLD), cached(tmp_path, NEW)
    age(recent, DAY)  # a candidate converted for its evaluation yesterday, say
    result = prune_artifacts(tmp_path, keep={KEPT}, older_than_s=GRACE)
    assert result.removed == [old]
    assert result.freed_bytes == len(b"artifact")
    assert not (tmp_path / OLD).exists()  # the model's folder too, once empty
    assert (kept / "model.onnx").is_file()
    assert (recent / "model.onnx").is_file()
    assert sorted(p.name for p in (tmp_path / KEPT).iterdir()) == [kept.name]  # nothing aside


def test_prune_artifacts_removes_older_fingerprints_of_kept_models(tmp_path: Path) -> None:
    current = cached(tmp_path, KEPT, "litert-int8")
    upgraded_away = cached(tmp_path, KEPT, "litert-int8", name="litert-int8-000000000000")
    other_image = cached(tmp_path, KEPT, "onnx", name="onnx-111111111111")
    age(other_image, 600)  # marked by a worker of another image that serves from it
    result = prune_artifacts(tmp_path, keep={KEPT}, older_than_s=GRACE)
    assert result.removed == [upgraded_away]
    assert {p.name for p in (tmp_path / KEPT).iterdir()} == {current.name, other_image.name}
    assert (current / "b2.tflite").is_file()


def test_prune_artifacts_deletes_old_set_aside_and_temporary_files_only(tmp_path: Path) -> None:
    folder = cached(tmp_path, KEPT)
    old_broken = folder / f".model.onnx.broken-{time.time_ns() - int(5 * DAY * 1e9)}"
    new_broken = folder / f".model.onnx.broken-{time.time_ns()}"
    crashed_write = folder / ".model.onnx.1234.5f3e.tmp"
    for path in (old_broken, new_broken, crashed_write, folder / ".lock"):
        path.write_bytes(b"x")
        age(path, 10 * DAY)  # `set_aside` renames: a broken file keeps its old mtime
    result = prune_artifacts(tmp_path, keep={KEPT}, older_than_s=GRACE)
    assert sorted(result.removed) == sorted([old_broken, crashed_write])
    assert sorted(p.name for p in folder.iterdir()) == [".lock", new_broken.name, "model.onnx"]


@pytest.mark.parametrize("host_clock_off_s", [-5 * DAY, 5 * DAY])
def test_a_file_set_aside_by_a_host_with_a_wrong_clock_keeps_its_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_clock_off_s: float
) -> None:
    # Regression: the name carried the host's clock and the pruner compared it with the file
    # server's: a host days behind had its broken files deleted at the next pass (no post-mortem
    # left), one days ahead kept them days past the grace period.
    folder = cached(tmp_path, KEPT)
    real_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + int(host_clock_off_s * 1e9))
    monkeypatch.setattr(time, "time", lambda: real_ns() / 1e9 + host_clock_off_s)
    assert convert.set_aside(folder, convert.artifact_identities(folder, ["model.onnx"]))
    monkeypatch.undo()
    (aside,) = folder.glob(".model.onnx.broken-*")
    assert prune_artifacts(tmp_path, keep={KEPT}, older_than_s=GRACE).removed == []
    assert aside.exists()
    # ... and once the grace period has passed on the file server's clock, it goes.
    assert prune_artifacts(tmp_path, keep={KEPT}, older_than_s=-60).removed == [aside]


def test_prune_artifacts_dry_run_lists_and_deletes_nothing(tmp_path: Path) -> None:
    old = cached(tmp_path, OLD)
    stale = cached(tmp_path, KEPT, name="onnx-000000000000")
    before = sorted(tmp_path.rglob("*"))
    result = prune_artifacts(tmp_path, keep={KEPT}, older_than_s=GRACE, dry_run=True)
    assert result.removed == [stale, old]
    assert result.freed_bytes == 2 * len(b"artifact")
    assert sorted(p for p in tmp_path.rglob("*") if p.name != ".prune.lock") == before


def test_prune_artifacts_never_takes_a_folder_a_worker_converts_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, finish = threading.Event(), threading.Event()

    def slow_conversion(model: Path, kind: str, folder: Path, names: list[str]) -> None:
        started.set()
        assert finish.wait(30)
        for name in names:
            (folder / name).write_bytes(b"artifact")

    monkeypatch.setattr(convert, "_convert_in_child", slow_conversion)
    worker = threading.Thread(
        target=ensure_artifacts,
        args=(tmp_path / "m.keras",),
        kwargs={"kind": "onnx", "artifact_dir": tmp_path, "sha256": OLD},
    )
    worker.start()
    try:
        assert started.wait(30)
        folder = artifact_folder(tmp_path, OLD, "onnx")
        age(folder, 10 * DAY)  # only the lock protects it now: unkept, and old
        result = prune_artifacts(tmp_path, keep=set(), older_than_s=GRACE)
        assert result.busy == [folder]
        assert result.removed == []
    finally:
        finish.set()
        worker.join(30)
    assert (folder / "model.onnx").read_bytes() == b"artifact"
    age(folder, 10 * DAY)
    assert prune_artifacts(tmp_path, keep=set(), older_than_s=GRACE).removed == [folder]


def test_a_conversion_that_waited_on_a_pruned_folder_converts_into_a_locked_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pruner renames a folder aside under its lock: a worker that was waiting on that lock
    # must not convert into the path without holding the lock there (a pruner would see the
    # new folder free) nor into nothing.
    held_while_converting: list[bool] = []

    def conversion(model: Path, kind: str, folder: Path, names: list[str]) -> None:
        held_while_converting.append(lock_is_held(folder))
        for name in names:
            (folder / name).write_bytes(b"artifact")

    monkeypatch.setattr(convert, "_convert_in_child", conversion)
    folder = artifact_folder(tmp_path, OLD, "onnx")
    folder.mkdir(parents=True)
    worker = threading.Thread(
        target=ensure_artifacts,
        args=(tmp_path / "m.keras",),
        kwargs={"kind": "onnx", "artifact_dir": tmp_path, "sha256": OLD},
    )
    with convert._locked(folder / ".lock"):  # the pruner's turn
        worker.start()
        time.sleep(0.5)  # the worker now waits on this lock
        os.rename(folder, folder.with_name(".gone.prune-0"))
    worker.join(30)
    assert held_while_converting == [True]
    assert (folder / "model.onnx").read_bytes() == b"artifact"
    assert (folder / ".lock").is_file()


def test_a_folder_loaded_while_being_pruned_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = cached(tmp_path, OLD)
    real_rename = os.rename
    renames: list[str] = []

    def load_then_rename(src: Path, dst: Path) -> None:
        if not renames:  # a worker loads it between the pruner's check and its rename
            ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=OLD)
        renames.append(Path(dst).name)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", load_then_rename)  # the module's `os.rename`
    result = prune_artifacts(tmp_path, keep=set(), older_than_s=GRACE)
    assert result.removed == []
    assert renames[1] == folder.name  # renamed aside, then back
    assert (folder / "model.onnx").read_bytes() == b"artifact"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_ensure_artifacts_marks_a_cached_folder_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = cached(tmp_path, OLD)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("converted a cached artifact again")

    monkeypatch.setattr(convert, "_convert_in_child", refuse)
    assert (
        ensure_artifacts(tmp_path / "m.keras", kind="onnx", artifact_dir=tmp_path, sha256=OLD)
        == folder
    )
    assert folder.stat().st_mtime > time.time() - 60
    assert prune_artifacts(tmp_path, keep=set(), older_than_s=GRACE).removed == []


def test_only_one_pruner_runs_at_a_time(tmp_path: Path) -> None:
    old = cached(tmp_path, OLD)
    with try_lock(tmp_path / ".prune.lock") as alone:
        assert alone
        result = prune_artifacts(tmp_path, keep=set(), older_than_s=GRACE)
    assert result.skipped
    assert old.is_dir()


def test_prune_artifacts_ages_folders_on_the_cache_filesystem_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a shared volume (NFS) a folder's mtime is the file server's time. A pruning host whose
    # clock runs days ahead must still see a folder marked just now as used, not as old.
    just_used = cached(tmp_path, OLD)
    os.utime(just_used)  # marked by a load: the filesystem's now
    unused = cached(tmp_path, NEW)
    host_now = time.time() + 10 * DAY
    monkeypatch.setattr(artifact_cache.time, "time", lambda: host_now)
    result = prune_artifacts(tmp_path, keep={KEPT}, older_than_s=GRACE)
    assert just_used.is_dir()
    assert not unused.exists()
    assert result.removed == [unused]
