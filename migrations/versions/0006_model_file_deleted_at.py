"""model_versions.file_deleted_at: when the pruner deleted a rejected version's model file

Rejected versions' files (and files no version names, of crashed retraining runs) are deleted
once older than SEG_MODEL_FILE_GRACE_DAYS (`segsvc.services.model_files`). The row stays, and
says so here; `rollout.promote` refuses such a version with a clear error.

A nullable column without a default: on Postgres a change of the catalog only.

A downgrade must not forget that a file is gone: with the column NULL again after a re-upgrade,
a rollback would make production a version whose file was deleted, which no new worker can
load. So the downgrade keeps each set value in the row's `metrics` JSON, under the reserved key
`_file_deleted_at` (an ISO timestamp), and the upgrade moves it back into the column. The
model_versions table holds a row per retraining run: a few hundred rows, read in one go.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 10:00:00
"""
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from migrations.ops import offline

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEPT_KEY = "_file_deleted_at"  # in `metrics` while the schema is older than this revision

versions = sa.table(
    "model_versions",
    sa.column("version", sa.String()),
    sa.column("metrics", sa.JSON()),
    sa.column("file_deleted_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("file_deleted_at", sa.DateTime(timezone=True)))
    if offline():  # a script reads nothing: the same move, in SQL (Postgres' JSON operators)
        op.execute(
            f"UPDATE model_versions SET file_deleted_at = (metrics ->> '{KEPT_KEY}')::timestamptz,"
            f" metrics = (metrics::jsonb - '{KEPT_KEY}')::json"
            f" WHERE json_typeof(metrics) = 'object' AND metrics::jsonb ? '{KEPT_KEY}'"
        )
        return
    bind = op.get_bind()
    for version, metrics in bind.execute(sa.select(versions.c.version, versions.c.metrics)):
        if not isinstance(metrics, dict) or KEPT_KEY not in metrics:
            continue
        rest = {key: value for key, value in metrics.items() if key != KEPT_KEY}
        deleted_at = datetime.fromisoformat(metrics[KEPT_KEY]).astimezone(UTC)
        bind.execute(
            versions.update()
            .where(versions.c.version == version)
            .values(metrics=rest, file_deleted_at=deleted_at)
        )


def downgrade() -> None:
    if offline():
        op.execute(
            "UPDATE model_versions SET metrics = (CASE WHEN json_typeof(metrics) = 'object'"
            " THEN metrics::jsonb ELSE '{}'::jsonb END"
            f" || jsonb_build_object('{KEPT_KEY}', to_char(file_deleted_at AT TIME ZONE 'UTC',"
            " 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')))::json"
            " WHERE file_deleted_at IS NOT NULL"
        )
        with op.batch_alter_table("model_versions") as batch:
            batch.drop_column("file_deleted_at")
        return
    bind = op.get_bind()
    pruned = bind.execute(
        sa.select(versions.c.version, versions.c.metrics, versions.c.file_deleted_at).where(
            versions.c.file_deleted_at.is_not(None)
        )
    ).all()
    for version, metrics, deleted_at in pruned:
        kept: dict[str, Any] = {**(metrics if isinstance(metrics, dict) else {})}
        kept[KEPT_KEY] = _utc(deleted_at).isoformat()
        bind.execute(
            versions.update().where(versions.c.version == version).values(metrics=kept)
        )
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("file_deleted_at")


def _utc(value: datetime) -> datetime:
    """SQLite hands timestamps back naive (they are UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
