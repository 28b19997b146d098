"""The blob folder's mark: a volume that is not mounted (or another store's) is refused, never
written to, and never read as missing files."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from segsvc import blob_mark
from segsvc.blob_mark import MARK_FILE, StoreNotMarkedError, adopt, read_mark
from segsvc.blobs import BlobStoreUnavailableError, FsBlobStore, blob_store
from segsvc.db import session_scope
from segsvc.errors import UnavailableError
from segsvc.models import BlobStoreMark
from segsvc.settings import Settings

DATA = b"\x89PNG\r\n\x1a\n" + os.urandom(1024)


@pytest.fixture(autouse=True)
def _fresh_checks() -> Iterator[None]:
    blob_mark.forget()
    yield
    blob_mark.forget()


@pytest.fixture
def cfg(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"blob_store": "fs", "blob_dir": tmp_path / "blobs"})


def marks(settings: Settings) -> list[tuple[str, str]]:
    with session_scope(settings) as session:
        return [(m.store_id, m.root) for m in session.scalars(select(BlobStoreMark))]


def unmount(folder: Path) -> Path:
    """The volume goes away: its mount point is an empty folder again."""
    away = folder.with_name(folder.name + ".away")
    folder.rename(away)
    folder.mkdir()
    blob_mark.forget()  # past the recheck interval
    return away


def test_the_first_write_marks_the_folder_and_the_database(cfg: Settings) -> None:
    pointer = blob_store(cfg).put(DATA)
    folder = cfg.blob_dir
    assert folder is not None
    store_id = read_mark(folder)
    assert store_id is not None
    assert len(store_id) == 32
    assert marks(cfg) == [(store_id, str(folder))]
    blob_mark.forget()
    assert blob_store(cfg).get(pointer) == DATA  # the same store: read as before
    blob_store(cfg).put(b"more")
    assert read_mark(folder) == store_id


def test_an_unmounted_volume_is_refused_not_written_and_not_read_as_missing(
    cfg: Settings,
) -> None:
    """Regression: a volume not mounted at SEG_BLOB_DIR left a folder that took uploads (lost
    at the next mount) and answered 410 Gone for results that were on the volume."""
    pointer = blob_store(cfg).put(DATA)
    folder = cfg.blob_dir
    assert folder is not None
    away = unmount(folder)
    with pytest.raises(StoreNotMarkedError) as refused:
        blob_store(cfg).put(b"an upload while the volume is away")
    assert isinstance(refused.value, BlobStoreUnavailableError)  # a 503 with Retry-After
    assert isinstance(refused.value, UnavailableError)
    assert list(folder.iterdir()) == []  # nothing written where the mount will hide it
    with pytest.raises(StoreNotMarkedError):
        blob_store(cfg).get(pointer)  # not BlobMissingError (a 410)
    with pytest.raises(StoreNotMarkedError):
        blob_store(cfg).sweep_checked(lambda names: set(), older_than_s=0)
    folder.rmdir()
    away.rename(folder)  # mounted again: no restart needed
    assert blob_store(cfg).get(pointer) == DATA
    assert len(marks(cfg)) == 1


def test_another_stores_folder_is_refused(cfg: Settings, tmp_path: Path) -> None:
    blob_store(cfg).put(DATA)
    folder = cfg.blob_dir
    assert folder is not None
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / MARK_FILE).write_text("f" * 32 + "\n")
    blob_mark.forget()
    with pytest.raises(StoreNotMarkedError):
        blob_store(cfg).put(DATA)
    assert sorted(p.name for p in folder.iterdir()) == [MARK_FILE]


def test_the_refusal_is_logged_once_a_minute_with_what_to_do(
    cfg: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    blob_store(cfg).put(DATA)
    assert cfg.blob_dir is not None
    unmount(cfg.blob_dir)
    for _ in range(3):
        with pytest.raises(StoreNotMarkedError):
            blob_store(cfg).put(DATA)
    errors = [r for r in caplog.records if r.name == "segsvc.blob_mark"]
    assert len(errors) == 1
    assert "is the volume mounted" in errors[0].getMessage()
    assert "segsvc blobs adopt" in errors[0].getMessage()


def test_adopt_makes_a_new_folder_the_store_with_the_same_id(cfg: Settings) -> None:
    blob_store(cfg).put(DATA)
    folder = cfg.blob_dir
    assert folder is not None
    (store_id, _root), *_ = marks(cfg)
    unmount(folder)
    with pytest.raises(StoreNotMarkedError):
        blob_store(cfg).put(DATA)
    assert adopt(cfg, folder) == (store_id, True)
    blob_store(cfg).put(DATA)  # accepted at once (adopt forgets this process's checks)
    assert read_mark(folder) == store_id
    assert marks(cfg) == [(store_id, str(folder))]
    assert adopt(cfg, folder) == (store_id, False)  # already the store


def test_first_writes_at_once_agree_on_one_mark(cfg: Settings) -> None:
    with ThreadPoolExecutor(8) as pool:
        pointers = list(pool.map(lambda i: blob_store(cfg).put(DATA + bytes([i])), range(16)))
    assert len(set(pointers)) == 16
    assert cfg.blob_dir is not None
    assert [m[0] for m in marks(cfg)] == [read_mark(cfg.blob_dir)]
    assert sorted(p.name for p in cfg.blob_dir.iterdir() if p.name.startswith(".")) == [MARK_FILE]


def test_a_store_in_use_before_marks_is_read_and_swept_unmarked_then_marked_by_a_write(
    cfg: Settings,
) -> None:
    folder = cfg.blob_dir
    assert folder is not None
    pointer = FsBlobStore(folder).put(DATA)  # written by a release without marks
    assert blob_store(cfg).get(pointer) == DATA
    assert blob_store(cfg).sweep_checked(lambda names: set(names), older_than_s=0) == 0
    assert read_mark(folder) is None
    assert marks(cfg) == []
    blob_store(cfg).put(b"the first write after the upgrade")
    assert marks(cfg) == [(read_mark(folder), str(folder))]


def test_the_database_store_reads_old_pointers_through_the_same_check(cfg: Settings) -> None:
    pointer = blob_store(cfg).put(DATA)
    db_cfg = cfg.model_copy(update={"blob_store": "db"})
    assert blob_store(db_cfg).get(pointer) == DATA
    assert cfg.blob_dir is not None
    unmount(cfg.blob_dir)
    with pytest.raises(StoreNotMarkedError):
        blob_store(db_cfg).get(pointer)
    assert blob_store(db_cfg).put(DATA) == DATA  # bytes in the row: no folder involved


def test_a_volume_without_hard_links_is_marked_in_place(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an SMB share or an S3 mount refuses link() (EPERM): the mark was never
    written, and every upload was refused for good."""

    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(blob_mark.os, "link", no_links)
    pointer = blob_store(cfg).put(DATA)
    assert cfg.blob_dir is not None
    store_id = read_mark(cfg.blob_dir)
    assert store_id is not None
    assert marks(cfg) == [(store_id, str(cfg.blob_dir))]
    assert sorted(p.name for p in cfg.blob_dir.iterdir() if p.name.startswith(".")) == [MARK_FILE]
    blob_mark.forget()
    assert blob_store(cfg).get(pointer) == DATA


def test_an_empty_mark_is_read_again_then_taken_for_none(tmp_path: Path) -> None:
    (tmp_path / MARK_FILE).write_text("")
    assert read_mark(tmp_path) is None
    (tmp_path / MARK_FILE).write_text("abc\n")
    assert read_mark(tmp_path) == "abc"


def test_a_folder_another_database_marked_is_refused_to_one_that_never_marked_a_store(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database with no mark row (a new deployment, or one restored from before its first
    file) passed a folder another database had marked: its sweep deleted every file there
    that it did not name (another deployment's queued and labelled jobs' files), and its first
    write took the other's mark as its own."""
    monkeypatch.setattr(blob_mark, "MARK_ROW_WAIT_S", 0.2)
    folder = cfg.blob_dir
    assert folder is not None
    theirs = FsBlobStore(folder).put(DATA)  # another deployment's file...
    blob_mark.write_mark(folder, "e" * 32)  # ...in its marked store
    store = blob_store(cfg)
    with pytest.raises(StoreNotMarkedError):
        store.sweep_checked(lambda names: set(), older_than_s=0)
    with pytest.raises(StoreNotMarkedError):
        store.get(theirs)
    with pytest.raises(StoreNotMarkedError):
        store.put(b"ours")
    assert FsBlobStore(folder).get(theirs) == DATA  # nothing deleted
    assert marks(cfg) == []  # nor taken as this database's store
    errors = [r.getMessage() for r in caplog.records if r.name == "segsvc.blob_mark"]
    assert len(errors) == 1  # once a minute
    assert "has never marked a store" in errors[0]
    assert "segsvc blobs adopt" in errors[0]
    assert adopt(cfg, folder) == (marks(cfg)[0][0], True)  # the operator's say-so
    blob_store(cfg).put(b"ours")


def test_a_first_write_cut_short_after_its_mark_is_recorded_by_the_next(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database went away between the mark file and its row: the folder kept a mark the
    database never recorded, and every later check took it for another deployment's store
    (503 on every submit until `segsvc blobs adopt`). It holds no file: recorded."""
    insert = blob_mark._insert_if_absent
    calls = 0

    def first_fails(dialect: str, values: dict[str, object]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return insert(dialect, values)

    monkeypatch.setattr(blob_mark, "_insert_if_absent", first_fails)
    monkeypatch.setattr(blob_mark, "MARK_ROW_WAIT_S", 0.2)
    with pytest.raises(OperationalError):
        blob_store(cfg).put(DATA)
    assert cfg.blob_dir is not None
    left = read_mark(cfg.blob_dir)
    assert left is not None
    assert marks(cfg) == []
    pointer = blob_store(cfg).put(DATA)
    assert marks(cfg) == [(left, str(cfg.blob_dir))]
    assert blob_store(cfg).get(pointer) == DATA


def test_a_refused_folder_does_not_hold_every_check_for_the_wait(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read, write and /readyz probe of another deployment's folder waited the whole
    wait for a row (5 s, past the probe's 2 s): refused once, it is not waited for again
    within the recheck interval."""
    from api.routes.health import READY_TIMEOUT_S

    assert blob_mark.MARK_ROW_WAIT_S < READY_TIMEOUT_S  # a probe answers with the reason
    monkeypatch.setattr(blob_mark, "MARK_ROW_WAIT_S", 1.0)
    folder = cfg.blob_dir
    assert folder is not None
    FsBlobStore(folder).put(DATA)
    blob_mark.write_mark(folder, "e" * 32)
    started = time.monotonic()
    for _ in range(4):
        with pytest.raises(StoreNotMarkedError):
            blob_store(cfg).put(DATA)
    assert time.monotonic() - started < 2.5  # the first waits 1 s; the others do not
