"""Blob storage switch: bytes in rows (db) or content-addressed files (fs)."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import update

from segsvc.blobs import (
    POINTER_PREFIX,
    BlobMissingError,
    BlobStoreUnavailableError,
    DbBlobStore,
    FsBlobStore,
    blob_store,
    is_pointer,
)
from segsvc.db import session_scope
from segsvc.errors import UnavailableError
from segsvc.models import Job, JobStatus, utcnow
from segsvc.settings import Settings

DATA = b"\x89PNG\r\n\x1a\n" + os.urandom(2048)


def fs_settings(tmp_path: Path, kind: str = "fs") -> Settings:
    return Settings(
        blob_store=kind,
        blob_dir=tmp_path / "blobs",
        var_dir=tmp_path,  # type: ignore[arg-type]
        _env_file=None,
    )  # type: ignore[call-arg]


def fs_store(tmp_path: Path) -> FsBlobStore:
    """The fs store of these tests of its files, with no mark check (no database: the mark is
    tested in test_blob_mark.py)."""
    return FsBlobStore(tmp_path / "blobs")


def test_blob_store_setting_selects_the_store(tmp_path: Path) -> None:
    assert isinstance(blob_store(fs_settings(tmp_path, "db")), DbBlobStore)
    store = blob_store(fs_settings(tmp_path))
    assert isinstance(store, FsBlobStore)
    assert store.kind == "fs"
    default_dir = Settings(blob_store="fs", var_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    assert blob_store(default_dir).root == tmp_path / "blobs"


def test_db_store_keeps_bytes_in_the_row(tmp_path: Path) -> None:
    store = blob_store(fs_settings(tmp_path, "db"))
    assert store.put(DATA) == DATA
    assert store.get(DATA) == DATA
    assert store.get(None) is None
    assert not (tmp_path / "blobs").exists()


def test_fs_store_writes_content_addressed_file_and_returns_pointer(tmp_path: Path) -> None:
    store = fs_store(tmp_path)
    value = store.put(DATA)
    digest = hashlib.sha256(DATA).hexdigest()
    assert value == POINTER_PREFIX + digest.encode()
    assert is_pointer(value)
    assert len(value) < 100
    assert (tmp_path / "blobs" / digest[:2] / digest[2:4] / digest).read_bytes() == DATA
    assert store.put(DATA) == value  # identical uploads share one file
    assert store.get(value) == DATA
    assert not list((tmp_path / "blobs").glob("**/*.tmp"))


def test_fs_store_concurrent_puts_of_the_same_bytes_all_succeed(tmp_path: Path) -> None:
    # Regression: the temporary file was named after the hash and the pid only, so two threads
    # writing the same new blob shared it and one rename failed (FileNotFoundError, a 500).
    store = fs_store(tmp_path)
    data = os.urandom(4 << 20)
    threads = 16
    start = threading.Barrier(threads)

    def put(_: int) -> bytes:
        start.wait()
        return store.put(data)

    with ThreadPoolExecutor(threads) as pool:
        values = list(pool.map(put, range(threads)))  # re-raises any thread's error
    digest = hashlib.sha256(data).hexdigest()
    assert values == [POINTER_PREFIX + digest.encode()] * threads
    assert store.path_for(digest).read_bytes() == data
    assert [p.name for p in (tmp_path / "blobs").glob("**/*") if p.is_file()] == [digest]


def test_switching_the_setting_keeps_old_rows_readable(settings: Settings, tmp_path: Path) -> None:
    """Rows written under db and under fs are read by either store, through a real jobs row."""
    db_cfg, fs_cfg = (
        settings.model_copy(update={"blob_store": kind, "blob_dir": tmp_path / "blobs"})
        for kind in ("db", "fs")
    )
    ids = []
    with session_scope(settings) as session:
        for cfg in (db_cfg, fs_cfg):
            job = Job(
                id=uuid.uuid4(),
                status=JobStatus.QUEUED,
                created_at=utcnow(),
                input_sha256="0" * 64,
                input_content_type="image/png",
                input_width=1,
                input_height=1,
                input_bytes=blob_store(cfg).put(DATA),
            )
            session.add(job)
            ids.append(job.id)
    with session_scope(settings) as session:
        stored = [session.get(Job, i).input_bytes for i in ids]  # type: ignore[union-attr]
    assert stored[0] == DATA
    assert is_pointer(stored[1])
    for cfg in (db_cfg, fs_cfg):
        assert [blob_store(cfg).get(v) for v in stored] == [DATA, DATA]
    with session_scope(settings) as session:  # a mask written later through the pointer store
        session.execute(
            update(Job).where(Job.id == ids[0]).values(mask_png=blob_store(fs_cfg).put(b"mask"))
        )
    with session_scope(settings) as session:
        assert blob_store(db_cfg).get(session.get(Job, ids[0]).mask_png) == b"mask"  # type: ignore[union-attr]


def test_fs_store_detects_missing_corrupt_and_malformed_blobs(tmp_path: Path) -> None:
    store = fs_store(tmp_path)
    value = store.put(DATA)
    path = store.path_for(hashlib.sha256(DATA).hexdigest())
    path.write_bytes(b"tampered")
    with pytest.raises(BlobMissingError, match="corrupt"):
        store.get(value)
    path.unlink()
    with pytest.raises(BlobMissingError, match="missing"):
        store.get(value)
    with pytest.raises(BlobMissingError, match="malformed"):
        store.get(POINTER_PREFIX + b"../../etc/passwd")
    with pytest.raises(BlobMissingError, match="blob_dir"):
        DbBlobStore(None).get(value)


def test_fs_sweep_removes_only_unreferenced_old_files(tmp_path: Path) -> None:
    store = fs_store(tmp_path)
    kept, dropped, fresh = store.put(b"kept"), store.put(b"dropped"), store.put(b"fresh")
    old = 1_000_000_000
    for value in (kept, dropped):
        path = store.path_for(value[len(POINTER_PREFIX) :].decode())
        os.utime(path, (old, old))
    assert store.sweep(keep=[kept, b"raw bytes", None], older_than_s=3600) == 1
    assert store.get(kept) == b"kept"
    assert store.get(fresh) == b"fresh"
    with pytest.raises(BlobMissingError):
        store.get(dropped)


def age(store: FsBlobStore | DbBlobStore, value: bytes, when: float = 1_000_000_000) -> Path:
    """Backdate the file a pointer names (as if written long ago); its path."""
    path = store.path_for(value[len(POINTER_PREFIX) :].decode())
    os.utime(path, (when, when))
    return path


def test_reusing_an_old_file_protects_it_from_a_sweep_that_read_its_rows_before(
    tmp_path: Path,
) -> None:
    # An upload identical to an old, unreferenced blob reuses its file; the row naming it is
    # not yet committed when a sweep reads the rows. The reuse must refresh the file.
    store = fs_store(tmp_path)
    path = age(store, value := store.put(DATA))
    assert store.put(DATA) == value
    assert store.sweep(keep=[], older_than_s=3600) == 0
    assert path.read_bytes() == DATA


def test_sweep_puts_back_a_file_reused_while_it_was_being_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fs_store(tmp_path)
    path = age(store, store.put(DATA))
    real_replace = os.replace

    def reused_then_moved(src: str | Path, dst: str | Path) -> None:
        if Path(src) == path:
            os.utime(src)  # a put refreshed it just before the sweep moved it aside
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", reused_then_moved)
    assert store.sweep(keep=[], older_than_s=3600) == 0
    assert path.read_bytes() == DATA
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_put_racing_the_sweeps_delete_writes_the_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fs_store(tmp_path)
    value = store.put(DATA)
    path = age(store, value)
    real_replace = os.replace
    raced: list[bytes] = []

    def moved_then_reused(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        if Path(src) == path and not raced:
            raced.append(store.put(DATA))  # finds no file: writes it anew

    monkeypatch.setattr(os, "replace", moved_then_reused)
    assert store.sweep(keep=[], older_than_s=3600) == 1
    assert raced == [value]
    assert store.get(value) == DATA


def test_sweep_removes_old_temporary_files_of_crashed_writes_only(tmp_path: Path) -> None:
    store = fs_store(tmp_path)
    path = store.path_for(hashlib.sha256(DATA).hexdigest())
    path.parent.mkdir(parents=True)
    crashed = path.with_name(f".{path.name}.1.a.tmp")
    writing = path.with_name(f".{path.name}.2.b.tmp")
    crashed.write_bytes(b"half")
    writing.write_bytes(b"half")
    os.utime(crashed, (1_000_000_000, 1_000_000_000))
    store.sweep(keep=[], older_than_s=3600)
    assert not crashed.exists()
    assert writing.exists()


def test_sweep_of_a_store_never_used_reads_no_rows(tmp_path: Path) -> None:
    def rows() -> Iterator[bytes]:
        raise AssertionError("read the rows")
        yield b""

    assert fs_store(tmp_path).sweep(keep=rows(), older_than_s=0) == 0
    assert DbBlobStore(None).sweep(keep=rows(), older_than_s=0) == 0


def test_a_new_blob_is_durable_before_its_pointer_is_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row naming the file commits right after `put`: the file's data, its name in its
    folder and the folders made for it must survive a power loss by then. Only the data was
    fsynced, so a crash could leave a committed job naming a file that was never there."""
    import stat

    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    store = fs_store(tmp_path)
    store.root.mkdir(parents=True)  # type: ignore[union-attr]
    monkeypatch.setattr(os, "fsync", recording)
    value = store.put(DATA)
    path = store.path_for(value[len(POINTER_PREFIX) :].decode())
    folders = {name for name, is_dir in synced if is_dir}
    # The blob's folder (its name), and each folder made for it, in its parent.
    assert folders == {str(path.parent), str(path.parent.parent), str(store.root)}
    assert any(not is_dir for _, is_dir in synced)  # the data, as before


def test_a_damaged_blob_file_is_written_again_not_shared_by_later_uploads(tmp_path: Path) -> None:
    store = fs_store(tmp_path)
    value = store.put(DATA)
    path = store.path_for(value[len(POINTER_PREFIX) :].decode())
    path.write_bytes(DATA[:10])  # cut short: a disk error, an interrupted copy
    assert store.put(DATA) == value
    assert store.get(value) == DATA


def test_a_sweep_asks_about_old_files_a_batch_at_a_time(tmp_path: Path) -> None:
    """It read every pointer the jobs table ever held into one set first: memory that grows
    with every mask ever stored, past the maintenance pod's limit within months."""
    store = fs_store(tmp_path)
    values = [store.put(DATA + bytes([i])) for i in range(7)]
    for value in values:
        age(store, value)
    named = {values[0][len(POINTER_PREFIX) :].decode()}
    asked: list[list[str]] = []

    def in_use(batch: list[str]) -> set[str]:
        asked.append(batch)
        return named & set(batch)

    assert store.sweep_checked(in_use, older_than_s=3600, batch=3) == 6  # type: ignore[union-attr]
    assert [len(b) for b in asked] == [3, 3, 1]
    assert store.get(values[0]) == DATA + bytes([0])


def test_a_store_that_cannot_be_written_or_read_is_unavailable_not_missing(
    tmp_path: Path,
) -> None:
    """A full, read-only, unmounted or stale volume is an outage (503, transient); only a file
    that is not there is missing."""
    not_a_folder = tmp_path / "blobs"
    not_a_folder.write_bytes(b"")
    with pytest.raises(BlobStoreUnavailableError) as raised:
        fs_store(tmp_path).put(DATA)
    assert isinstance(raised.value, UnavailableError)
    assert raised.value.http_status == 503
    assert raised.value.retry_after
    assert isinstance(raised.value.__cause__, OSError)
    assert str(tmp_path) not in raised.value.message  # answered to clients as is
    not_a_folder.unlink()
    store = fs_store(tmp_path)
    value = store.put(DATA)
    path = store.path_for(hashlib.sha256(DATA).hexdigest())
    path.unlink()
    with pytest.raises(BlobMissingError):
        store.get(value)
    path.mkdir()  # there, but unreadable (as EIO, EACCES or ESTALE)
    with pytest.raises(BlobStoreUnavailableError):
        store.get(value)
