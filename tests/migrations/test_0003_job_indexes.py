"""Migration 0003 on Postgres: it can be run again after a concurrent index build failed, or
after it was stopped anywhere before its revision was written."""

from __future__ import annotations

from alembic import command
from sqlalchemy import text

from segsvc.db import get_engine
from segsvc.migrate import alembic_config, upgrade
from segsvc.settings import Settings
from tests.migrations.index_builds import (
    fail_unique_build,
    index_definitions,
    index_validity,
    insert_jobs,
)

NEW = {
    "ix_jobs_anonymous_idempotency",
    "ix_webhook_endpoints_anonymous_url",
    "ix_jobs_input_kept_created_at",
    "ix_jobs_input_kept_sha256",
}
OLD = {"ix_jobs_client_id", "ix_jobs_model_version"}


def test_0003_runs_again_after_its_unique_build_failed_on_a_duplicate(pg_db: Settings) -> None:
    # Regression: a twin submitted between the deduplication and the CONCURRENTLY build failed
    # the unique index, which stayed INVALID under its name (the revision at 0002); every retry
    # then failed on "relation already exists".
    upgrade(settings=pg_db, revision="0002")
    insert_jobs(pg_db, 2, idempotency_key="twin")
    fail_unique_build(
        pg_db,
        "ix_jobs_anonymous_idempotency",
        on="jobs (idempotency_key) WHERE client_id IS NULL",
    )
    assert index_validity(pg_db, NEW) == {"ix_jobs_anonymous_idempotency": False}
    upgrade(settings=pg_db, revision="0003")
    assert index_validity(pg_db, NEW | OLD) == dict.fromkeys(NEW, True)
    with get_engine(pg_db).connect() as conn:  # the retry deduplicated the twins first
        keys = list(conn.scalars(text("SELECT idempotency_key FROM jobs")))
    assert sorted(keys, key=lambda key: key or "") == [None, "twin"]
    assert (
        "WHERE (client_id IS NULL)"
        in index_definitions(pg_db, NEW)["ix_jobs_anonymous_idempotency"]
    )


def test_0003_runs_again_after_it_was_stopped_before_its_revision_was_written(
    pg_db: Settings,
) -> None:
    upgrade(settings=pg_db, revision="0003")
    command.stamp(alembic_config(pg_db), "0002")  # built and dropped all, the revision not moved
    upgrade(settings=pg_db, revision="0003")
    assert index_validity(pg_db, NEW | OLD) == dict.fromkeys(NEW, True)
    command.downgrade(alembic_config(pg_db), "0002")
    command.stamp(alembic_config(pg_db), "0003")
    command.downgrade(alembic_config(pg_db), "0002")
    assert index_validity(pg_db, NEW | OLD) == dict.fromkeys(OLD, True)
