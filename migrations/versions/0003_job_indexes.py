"""job indexes: anonymous idempotency keys unique, indexes for retention, two unused dropped

- With `SEG_AUTH_REQUIRED=false` every job has `client_id` NULL, and a unique index counts NULLs
  as distinct: two concurrent submits with one `Idempotency-Key` both inserted, and every retry
  then got 422. A partial unique index on the key alone where `client_id IS NULL` closes that
  (the same for webhook endpoints, one row per URL). Partial indexes work on every Postgres
  version and on SQLite, unlike `NULLS NOT DISTINCT` (Postgres 15+).
- The hourly retention purge filters on `created_at` among jobs that still hold an input; a
  partial index on exactly that keeps it from reading every old job on each run. With the `fs`
  blob store it then deletes the purged inputs' files unless an identical upload (same sha256)
  still keeps one: a partial index on `input_sha256` answers that.
- `ix_jobs_client_id` repeats the first column of `ix_jobs_client_idempotency`, and no query
  filters on `model_version`: both cost a write on every submit or completion for nothing.

Duplicates the old indexes let in are resolved first (see DEDUPLICATE), and the indexes are
built and dropped CONCURRENTLY on Postgres, so submits and claims go on meanwhile.

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


# Rows the missing indexes let in: a later twin of an anonymous job with the same key (the
# oldest keeps it; a retry with that key then replays the oldest, as it would have), and
# duplicate anonymous endpoint rows (one kept, disabled if any of them was).
DEDUPLICATE = (
    """
    UPDATE jobs SET idempotency_key = NULL
    WHERE client_id IS NULL AND idempotency_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM jobs AS older
        WHERE older.client_id IS NULL AND older.idempotency_key = jobs.idempotency_key
          AND (older.created_at < jobs.created_at
               OR (older.created_at = jobs.created_at AND older.id < jobs.id)))
    """,
    """
    UPDATE webhook_endpoints SET
        disabled_at = (SELECT MAX(twin.disabled_at) FROM webhook_endpoints AS twin
                       WHERE twin.client_id IS NULL AND twin.url = webhook_endpoints.url),
        disabled_reason = (SELECT MAX(twin.disabled_reason) FROM webhook_endpoints AS twin
                           WHERE twin.client_id IS NULL AND twin.url = webhook_endpoints.url)
    WHERE client_id IS NULL AND EXISTS (
        SELECT 1 FROM webhook_endpoints AS twin
        WHERE twin.client_id IS NULL AND twin.url = webhook_endpoints.url
          AND twin.id <> webhook_endpoints.id)
    """,
    """
    DELETE FROM webhook_endpoints
    WHERE client_id IS NULL AND EXISTS (
        SELECT 1 FROM webhook_endpoints AS twin
        WHERE twin.client_id IS NULL AND twin.url = webhook_endpoints.url
          AND twin.id < webhook_endpoints.id)
    """,
)


def upgrade() -> None:
    for statement in DEDUPLICATE:
        op.execute(statement)
    # Built CONCURRENTLY on Postgres (outside the migration's transaction): a plain CREATE
    # INDEX would block every submit and claim on a large jobs table until it finished.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_jobs_anonymous_idempotency",
            "jobs",
            ["idempotency_key"],
            unique=True,
            postgresql_concurrently=True,
            **_where("client_id IS NULL"),
        )
        op.create_index(
            "ix_webhook_endpoints_anonymous_url",
            "webhook_endpoints",
            ["url"],
            unique=True,
            postgresql_concurrently=True,
            **_where("client_id IS NULL"),
        )
        op.create_index(
            "ix_jobs_input_kept_created_at",
            "jobs",
            ["created_at"],
            postgresql_concurrently=True,
            **_where("input_bytes IS NOT NULL"),
        )
        op.create_index(
            "ix_jobs_input_kept_sha256",
            "jobs",
            ["input_sha256"],
            postgresql_concurrently=True,
            **_where("input_bytes IS NOT NULL"),
        )
        op.drop_index("ix_jobs_client_id", table_name="jobs", postgresql_concurrently=True)
        op.drop_index("ix_jobs_model_version", table_name="jobs", postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_jobs_model_version", "jobs", ["model_version"], postgresql_concurrently=True
        )
        op.create_index("ix_jobs_client_id", "jobs", ["client_id"], postgresql_concurrently=True)
        for name, table in (
            ("ix_jobs_input_kept_sha256", "jobs"),
            ("ix_jobs_input_kept_created_at", "jobs"),
            ("ix_webhook_endpoints_anonymous_url", "webhook_endpoints"),
            ("ix_jobs_anonymous_idempotency", "jobs"),
        ):
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
