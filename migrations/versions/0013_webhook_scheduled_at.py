"""webhook_messages.scheduled_at: the retry time a message's own last attempt set

`next_attempt_at` is moved by the endpoint's pauses as well as by the message's own backoff: a
failure puts the endpoint's backlog off to the pause's end, and a delivery let go every message
more than a lease ahead, as if a pause had put it there. It could not tell one a pause put off
from one that its own backoff scheduled far ahead, so a message that kept failing on its own (a
receiver that answers 400 to job.started and 204 to job.completed) was tried again after every
delivery to its endpoint, each time pausing it, for the whole max age. Each attempt now records
its retry time here (`segsvc.webhooks.dispatch.finish_attempt`); a pause moves a message to the
later of it and the pause's end, and a delivery lets a message go no earlier than it.

A nullable column without a default: on Postgres a change of the catalog only. NULL where no
attempt set it: a message never attempted (its own time is when it was recorded), and one
attempted only before this release, which a delivery lets go as before, at most once (its next
attempt records its time).

A downgrade forgets the retry times (the older schema has nowhere to keep them); after a
re-upgrade each pending message that was attempted may be tried once early, as before 0013,
when its endpoint next delivers something. Every other message is as it was.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_messages") as batch:
        batch.add_column(sa.Column("scheduled_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("webhook_messages") as batch:
        batch.drop_column("scheduled_at")
