"""jobs.releases: claims a worker gave back, which are not lost runs

A worker gives a batch's jobs back when its forward pass or its result write fails. That used to
count as an attempt, so a job given back twice was treated as a suspect poison input, and one
loss later it failed as `poison_input`; a job given back every time cycled for ever. Now lost
runs are `attempts - releases`, and a job given back five times over at least five minutes
(`first_released_at`) fails with `worker_error`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 23:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("releases", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("first_released_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("first_released_at")
        batch.drop_column("releases")
