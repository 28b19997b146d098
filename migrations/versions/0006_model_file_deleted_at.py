"""model_versions.file_deleted_at: when the pruner deleted a rejected version's model file

Rejected versions' files (and files no version names, of crashed retraining runs) are deleted
once older than SEG_MODEL_FILE_GRACE_DAYS (`segsvc.services.model_files`). The row stays, and
says so here; `rollout.promote` refuses such a version with a clear error.

A nullable column without a default: on Postgres a change of the catalog only.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("file_deleted_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("file_deleted_at")
