"""ended jobs let go of their model input: clear it on jobs that ended before this release

Since this release the statement that ends a job (succeeded, failed or canceled) also sets
`model_input` to NULL (`segsvc.models.ENDED_JOB_CLEARS`): the 48 KiB array the API derived
from the upload serves the worker's claim only, and the upload itself stays for retraining and
overlays. Jobs that ended earlier still hold theirs, and a labeled job's would never go (the
retention purge skips labeled jobs); this clears them.

A job table can be large, so the work runs outside the migration's transaction, a batch of
BATCH jobs at a time (each batch its own short transaction), walking the primary key: submits
and claims go on meanwhile, and no transaction holds millions of row versions. It can be
stopped and run again at any point. Downgrading restores nothing: an ended job needs no model
input (`segsvc.services.jobs` reads it only in a claim, which takes queued jobs).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 05:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.ops import note, offline, patient_block

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1000
ENDED = ("succeeded", "failed", "canceled")

jobs = sa.table(
    "jobs",
    sa.column("id", sa.Uuid()),
    sa.column("status", sa.String()),
    sa.column("model_input", sa.LargeBinary()),
)


def upgrade() -> None:
    if offline():  # a script cannot walk the key: one statement, in its own transaction
        note(f"On a large jobs table, run this UPDATE in batches of ids ({BATCH} at a time).")
        op.execute(
            jobs.update()
            .where(jobs.c.status.in_(ENDED), jobs.c.model_input.is_not(None))
            .values(model_input=None)
        )
        return
    with patient_block():
        bind = op.get_bind()
        after = None
        while True:
            page = sa.select(jobs.c.id).order_by(jobs.c.id).limit(BATCH)
            if after is not None:
                page = page.where(jobs.c.id > after)
            ids = list(bind.execute(page).scalars())
            if not ids:
                break
            bind.execute(
                jobs.update()
                .where(
                    jobs.c.id.in_(ids),
                    jobs.c.status.in_(ENDED),
                    jobs.c.model_input.is_not(None),
                )
                .values(model_input=None)
            )
            after = ids[-1]


def downgrade() -> None:
    pass
