"""webhook messages pending per endpoint; jobs.last_released_at and .window_releases

`ix_webhook_messages_pending_endpoint`: the pending messages of one endpoint (client, URL),
by `next_attempt_at`. When an endpoint fails, its backlog is moved in one UPDATE past the
pause's end (`segsvc.webhooks.dispatch.record_endpoint_outcome`), out of the range of the
claim's index: left due, every claim (each webhook worker's, every second) read the whole
backlog of a paused endpoint before its anti-join dropped it. That UPDATE, a probe's and the
one after a delivery found the endpoint's messages by reading every pending message of every
client. Partial: delivered and failed history is not indexed.

`jobs.last_released_at`, `jobs.window_releases`: a job given back `MAX_RELEASES` times over
`RELEASE_GIVE_UP_S` ends failed (`segsvc.services.jobs.give_back_job`). The window was timed
from the first release ever, so one release long ago and a few during a one-second blip ended
a job. A release that follows the previous one by more than `RELEASE_GIVE_UP_S` now starts
the window again (`first_released_at`), and the releases in the window are counted apart from
`releases` (which the reconciler subtracts from `attempts`: not lost runs). NULL on rows of
earlier releases: their count is `releases`, as it was.

The columns are nullable without a default (a change of the catalog only); the index is built
and dropped CONCURRENTLY on Postgres (outside the migration's transaction), as 0009's: a
re-run skips the columns already added and drops an INVALID leftover of a failed build first.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 10:00:00
"""
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from migrations.ops import (
    IndexSpec,
    create_indexes_concurrently,
    drop_indexes_concurrently,
    offline,
    partial_where,
)

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = (
    ("last_released_at", sa.DateTime(timezone=True)),
    ("window_releases", sa.Integer()),
)

# (name, table, columns, keywords); the same as `segsvc.models`.
INDEXES: tuple[IndexSpec, ...] = (
    (
        "ix_webhook_messages_pending_endpoint",
        "webhook_messages",
        ["client_id", "url", "next_attempt_at"],
        partial_where("status = 'pending'"),
    ),
)


def upgrade() -> None:
    if offline():  # a script cannot look: Postgres skips a column already there by itself
        for name, type_ in COLUMNS:
            kind = type_.compile(dialect=op.get_context().dialect)
            op.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {name} {kind}")
        create_indexes_concurrently(INDEXES)
        return
    present = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("jobs")}
    with op.batch_alter_table("jobs") as batch:
        for name, type_ in COLUMNS:
            if name not in present:
                batch.add_column(sa.Column(name, type_))
    create_indexes_concurrently(INDEXES)


def downgrade() -> None:
    drop_indexes_concurrently(INDEXES)
    with op.batch_alter_table("jobs") as batch:
        for name, _type in reversed(COLUMNS):
            batch.drop_column(name)
