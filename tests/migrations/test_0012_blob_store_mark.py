"""Migration 0012: the blob store's mark; a downgrade drops it and the folder's mark file is
adopted again by the first write after the re-upgrade (no refusal, no new id)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from segsvc import blob_mark
from segsvc.blobs import blob_store
from segsvc.db import get_engine, session_scope
from segsvc.migrate import alembic_config, upgrade
from segsvc.models import BlobStoreMark
from segsvc.settings import Settings


def test_0012_a_downgrade_and_upgrade_keep_the_folders_mark(
    empty_db: Settings, tmp_path: Path
) -> None:
    cfg = empty_db.model_copy(update={"blob_store": "fs", "blob_dir": tmp_path / "blobs"})
    upgrade(settings=cfg)
    blob_mark.forget()
    pointer = blob_store(cfg).put(b"a mask")
    store_id = blob_mark.read_mark(tmp_path / "blobs")
    command.downgrade(alembic_config(cfg), "0011")
    assert "blob_store_mark" not in inspect(get_engine(cfg)).get_table_names()
    upgrade(settings=cfg)
    blob_mark.forget()
    assert blob_store(cfg).get(pointer) == b"a mask"  # read: passes unmarked
    blob_store(cfg).put(b"another")  # the first write records the folder's own mark
    with session_scope(cfg) as session:
        assert session.scalars(select(BlobStoreMark.store_id)).all() == [store_id]
    with pytest.raises(IntegrityError, match=r"(?i)check"), session_scope(cfg) as session:
        session.add(BlobStoreMark(id=2, store_id="x", root="/elsewhere"))
