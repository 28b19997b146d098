"""blob_store_mark: the id of the folder the file blobs are in

With `SEG_BLOB_STORE=fs` the rows point at files under `SEG_BLOB_DIR`. A volume that is not
mounted there left a folder that looked like an empty store: uploads were written where the
mount would later hide them, and results that were on the volume answered 410 Gone. The first
process to use the store now writes a random id to `<blob_dir>/.segsvc-store` and records it
in this one-row table (`segsvc.blob_mark`); a folder without that file, or with another id,
is refused as unavailable (503, retried) until the volume is back or an operator adopts the
folder (`segsvc blobs adopt`).

A new table: nothing existing is read or rewritten. A store in use before this release is
marked by its first write after it. The downgrade drops the table; the folder's file stays
(harmless: the sweep leaves dot-files alone) and is recorded again after a re-upgrade, the
database naming files in a store (`segsvc.blob_mark.check_mark`).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "blob_store_mark",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("store_id", sa.String(length=64), nullable=False),
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_blob_store_mark_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_store_mark")),
    )


def downgrade() -> None:
    op.drop_table("blob_store_mark")
