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
built and dropped CONCURRENTLY on Postgres, so submits and claims go on meanwhile. A concurrent
build that fails (a duplicate submitted meanwhile) or is cancelled leaves an INVALID index of its
name behind, and the revision at 0002: a re-run drops those first, skips what was already built
or dropped, and can always be run again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 23:00:00
"""
from collections.abc import Sequence

from alembic import op

from migrations.ops import drop_invalid_indexes, partial_where, patient_block

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None



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


# (name, table, columns, unique, condition)
NEW_INDEXES = (
    ("ix_jobs_anonymous_idempotency", "jobs", ["idempotency_key"], True, "client_id IS NULL"),
    ("ix_webhook_endpoints_anonymous_url", "webhook_endpoints", ["url"], True, "client_id IS NULL"),
    ("ix_jobs_input_kept_created_at", "jobs", ["created_at"], False, "input_bytes IS NOT NULL"),
    ("ix_jobs_input_kept_sha256", "jobs", ["input_sha256"], False, "input_bytes IS NOT NULL"),
)
# (name, columns) on jobs
OLD_INDEXES = (("ix_jobs_client_id", ["client_id"]), ("ix_jobs_model_version", ["model_version"]))


def upgrade() -> None:
    for statement in DEDUPLICATE:
        op.execute(statement)
    # Built CONCURRENTLY on Postgres (outside the migration's transaction): a plain CREATE
    # INDEX would block every submit and claim on a large jobs table until it finished.
    with patient_block():
        drop_invalid_indexes([index[0] for index in NEW_INDEXES])
        for name, table, columns, unique, condition in NEW_INDEXES:
            op.create_index(
                name,
                table,
                columns,
                unique=unique,
                postgresql_concurrently=True,
                if_not_exists=True,
                **partial_where(condition),
            )
        for name, _columns in OLD_INDEXES:
            op.drop_index(name, table_name="jobs", postgresql_concurrently=True, if_exists=True)


def downgrade() -> None:
    with patient_block():
        drop_invalid_indexes([name for name, _columns in OLD_INDEXES])
        for name, columns in reversed(OLD_INDEXES):
            op.create_index(name, "jobs", columns, postgresql_concurrently=True, if_not_exists=True)
        for name, table, *_ in reversed(NEW_INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
