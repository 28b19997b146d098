"""webhook_messages.redelivered_at: when a client last asked for the message to be sent again

A message past `SEG_WEBHOOK_MAX_AGE_SECONDS` that was never attempted ends `failed` without
an attempt (not sent days late). A redelivery is a request to send it now, whatever its age:
its first attempt after `redelivered_at` is made (`segsvc.webhooks.dispatch.start_attempt`);
the retries after it stay bounded by the max age.

A nullable column without a default: on Postgres a change of the catalog only.

A downgrade forgets the redeliveries (there is no column of the older schema to keep them in:
the payload is sent as it is). What is lost is small and bounded: after a re-upgrade, a message
past its max age that a client asked to redeliver, and that got no attempt meanwhile, ends
failed instead of being attempted once; the client can ask again. Every other message is as
it was.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_messages") as batch:
        batch.add_column(sa.Column("redelivered_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("webhook_messages") as batch:
        batch.drop_column("redelivered_at")
