"""job indexes: anonymous idempotency keys unique, an index for retention, two unused dropped

- With `SEG_AUTH_REQUIRED=false` every job has `client_id` NULL, and a unique index counts NULLs
  as distinct: two concurrent submits with one `Idempotency-Key` both inserted, and every retry
  then got 422. A partial unique index on the key alone where `client_id IS NULL` closes that
  (the same for webhook endpoints, one row per URL). Partial indexes work on every Postgres
  version and on SQLite, unlike `NULLS NOT DISTINCT` (Postgres 15+).
- The hourly retention purge filters on `created_at` among jobs that still hold an input; a
  partial index on exactly that keeps it from reading every old job on each run.
- `ix_jobs_client_id` repeats the first column of `ix_jobs_client_idempotency`, and no query
  filters on `model_version`: both cost a write on every submit or completion for nothing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 23:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _where(condition: str) -> dict[str, sa.TextClause]:
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


def upgrade() -> None:
    op.create_index(
        "ix_jobs_anonymous_idempotency",
        "jobs",
        ["idempotency_key"],
        unique=True,
        **_where("client_id IS NULL"),
    )
    op.create_index(
        "ix_webhook_endpoints_anonymous_url",
        "webhook_endpoints",
        ["url"],
        unique=True,
        **_where("client_id IS NULL"),
    )
    op.create_index(
        "ix_jobs_input_kept_created_at",
        "jobs",
        ["created_at"],
        **_where("input_bytes IS NOT NULL"),
    )
    op.drop_index("ix_jobs_client_id", table_name="jobs")
    op.drop_index("ix_jobs_model_version", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_model_version", "jobs", ["model_version"], unique=False)
    op.create_index("ix_jobs_client_id", "jobs", ["client_id"], unique=False)
    op.drop_index("ix_jobs_input_kept_created_at", table_name="jobs")
    op.drop_index("ix_webhook_endpoints_anonymous_url", table_name="webhook_endpoints")
    op.drop_index("ix_jobs_anonymous_idempotency", table_name="jobs")
