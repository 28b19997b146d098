"""Migration 0006: a downgrade past it keeps which versions' model files the pruner deleted,
and the upgrade after it puts that back (a rollback must never restore such a version)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import select

from segsvc.db import session_scope
from segsvc.migrate import alembic_config, upgrade
from segsvc.models import ModelStatus, ModelVersion
from segsvc.services import rollout
from segsvc.settings import Settings

PRUNED_AT = datetime(2026, 11, 20, 8, 30, 15, 250000, tzinfo=UTC)


def pruned_version() -> ModelVersion:
    """An archived version `v1` whose model file the pruner deleted at PRUNED_AT."""
    return ModelVersion(
        version="v1",
        path="/m/ft-1.keras",
        sha256="a" * 64,
        status=ModelStatus.ARCHIVED,
        metrics={"mean_iou": 0.7},
        promoted_at=PRUNED_AT,
        retired_at=PRUNED_AT,
        file_deleted_at=PRUNED_AT,
    )


def test_0006_a_pruned_version_stays_unservable_across_a_downgrade(empty_db: Settings) -> None:
    upgrade(settings=empty_db)
    with session_scope(empty_db) as session:
        session.add_all(
            [
                pruned_version(),
                ModelVersion(
                    version="v2",
                    path="/m/ft-2.keras",
                    sha256="b" * 64,
                    status=ModelStatus.PRODUCTION,
                    metrics={"mean_iou": 0.8},
                    promoted_at=PRUNED_AT,
                    parent_version="v1",
                ),
            ]
        )
    command.downgrade(alembic_config(empty_db), "0005")  # one step past 0006, then forward
    upgrade(settings=empty_db)
    with session_scope(empty_db) as session:
        rows = {v.version: v for v in session.scalars(select(ModelVersion)).all()}
        assert rows["v1"].file_deleted_at == PRUNED_AT
        assert rows["v2"].file_deleted_at is None
        assert rows["v1"].metrics == {"mean_iou": 0.7}  # the kept fact is moved, not copied
        assert rows["v2"].metrics == {"mean_iou": 0.8}
    with session_scope(empty_db) as session, pytest.raises(rollout.ConflictError):
        rollout.rollback(session=session)  # v1's file is gone: refused, as before the downgrade
