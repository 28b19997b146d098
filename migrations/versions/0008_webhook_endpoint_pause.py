"""webhook_endpoints.failures and .paused_until: a failing endpoint pauses on its own

One client's endpoint that times out used to hold delivery threads for every one of its
messages, while every other client's notices queued behind them. An endpoint's consecutive
failed attempts now pause all of its messages (`segsvc.webhooks.dispatch`), and the first
delivery after that resumes them.

An integer with a constant default and a nullable column: on Postgres 11+ both are changes of
the catalog only, however many rows the table holds.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("paused_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("paused_until")
        batch.drop_column("failures")
