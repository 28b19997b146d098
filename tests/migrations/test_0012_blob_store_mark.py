"""Migration 0012: the blob store's mark; a downgrade drops it and the folder's mark file is
recorded again after the re-upgrade, the database naming files in a store (no refusal, no new
id)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from segsvc import blob_mark
from segsvc.blobs import blob_store
from segsvc.db import get_engine, session_scope
from segsvc.images import validate_image
from segsvc.migrate import alembic_config, upgrade
from segsvc.models import BlobStoreMark
from segsvc.services import jobs as job_service
from segsvc.settings import Settings
from tests.segsvc.webhooks.factories import png_bytes


def test_0012_a_downgrade_and_upgrade_keep_the_folders_mark(
    empty_db: Settings, tmp_path: Path
) -> None:
    cfg = empty_db.model_copy(update={"blob_store": "fs", "blob_dir": tmp_path / "blobs"})
    upgrade(settings=cfg)
    blob_mark.forget()
    pointer = blob_store(cfg).put(b"a mask")
    name_a_mask(cfg, pointer)  # as the worker's result writes do
    store_id = blob_mark.read_mark(tmp_path / "blobs")
    command.downgrade(alembic_config(cfg), "0011")
    assert "blob_store_mark" not in inspect(get_engine(cfg)).get_table_names()
    upgrade(settings=cfg)
    blob_mark.forget()
    assert blob_store(cfg).get(pointer) == b"a mask"  # the first use records the folder's mark
    blob_store(cfg).put(b"another")
    with session_scope(cfg) as session:
        assert session.scalars(select(BlobStoreMark.store_id)).all() == [store_id]
    with pytest.raises(IntegrityError, match=r"(?i)check"), session_scope(cfg) as session:
        session.add(BlobStoreMark(id=2, store_id="x", root="/elsewhere"))


def name_a_mask(settings: Settings, pointer: bytes) -> None:
    """A succeeded job whose result mask is the file at `pointer`."""
    image = validate_image(png_bytes(), max_bytes=10**6, max_pixels=10**6)
    with session_scope(settings) as session:
        job = job_service.create_job(session=session, image=image)
        job.mask_png = pointer
