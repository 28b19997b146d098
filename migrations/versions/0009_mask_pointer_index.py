"""ix_jobs_mask_pointer: which result masks name a blob file

With `SEG_BLOB_STORE=fs`, uploads and result masks share one content-addressed folder, so an
upload byte-identical to some job's mask (a client sending a returned mask back as an image)
names the same file. The retention purge checked only the inputs still kept before deleting
a purged input's file, and deleted that other job's mask with it. It now asks this index too.

Partial: only values of a pointer's length (83 bytes) are indexed, so with the `db` store,
whose rows hold the masks' bytes, it stays empty. Built and dropped CONCURRENTLY on Postgres
(outside the migration's transaction), as 0005's indexes are: a re-run drops an INVALID
leftover of a failed build first.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 14:00:00
"""
from collections.abc import Sequence

from alembic import op

from migrations.ops import drop_invalid_indexes, partial_where, patient_block

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_jobs_mask_pointer"
CONDITION = "length(mask_png) = 83"  # the same as `segsvc.models.Job.__table_args__`


def upgrade() -> None:
    with patient_block():
        drop_invalid_indexes([NAME])
        op.create_index(
            NAME,
            "jobs",
            ["mask_png"],
            postgresql_concurrently=True,
            if_not_exists=True,
            **partial_where(CONDITION),
        )


def downgrade() -> None:
    with patient_block():
        op.drop_index(NAME, table_name="jobs", postgresql_concurrently=True, if_exists=True)
