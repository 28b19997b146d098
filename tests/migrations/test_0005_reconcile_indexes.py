"""Migration 0005: the reconciler's partial indexes (and, on Postgres, the statistics that let
the planner pick the suspect index), up and down, matching the model."""

from __future__ import annotations

import importlib.util
import uuid
from types import ModuleType

from alembic import command
from sqlalchemy import Index, inspect, text

from segsvc.db import get_engine
from segsvc.migrate import alembic_config, upgrade
from segsvc.models import Job
from segsvc.services.reconcile import SUSPECT_AFTER_ATTEMPTS
from segsvc.settings import Settings
from tests.conftest import ROOT
from tests.migrations.index_builds import (
    build_concurrently,
    fail_unique_build,
    index_definitions,
    index_validity,
    insert_jobs,
)

NAMES = {
    "ix_jobs_running_lease",
    "ix_jobs_queued_created_at_id",
    "ix_jobs_suspect_status_lease",
    "ix_jobs_queued_cancel_requested",
}


def migration() -> ModuleType:
    path = ROOT / "migrations" / "versions" / "0005_reconcile_indexes.py"
    spec = importlib.util.spec_from_file_location("migration_0005", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_indexes(settings: Settings) -> set[str]:
    with get_engine(settings).connect() as conn:
        return {str(ix["name"]) for ix in inspect(conn).get_indexes("jobs")}


def statistics(settings: Settings) -> list[str]:
    if settings.database_url is None:
        return []
    with get_engine(settings).connect() as conn:
        return list(conn.scalars(text("SELECT stxname FROM pg_statistic_ext")))


def test_0005_builds_the_reconciler_indexes_and_drops_them(empty_db: Settings) -> None:
    upgrade(settings=empty_db, revision="0004")
    with get_engine(empty_db).begin() as conn:  # a job already lost twice, on the old schema
        conn.execute(
            text(
                "INSERT INTO jobs (id, status, created_at, attempts, cancel_requested, "
                "input_sha256, input_content_type, input_width, input_height) VALUES (:id, "
                "'queued', '2026-11-26 10:00:00+00', 2, false, '0', 'image/png', 1, 1)"
            ),
            {"id": uuid.uuid4().hex if empty_db.database_url is None else uuid.uuid4()},
        )
    assert not NAMES & job_indexes(empty_db)
    upgrade(settings=empty_db)
    assert job_indexes(empty_db) >= NAMES
    on_postgres = empty_db.database_url is not None
    assert statistics(empty_db) == (["jobs_lost_runs"] if on_postgres else [])
    if on_postgres:  # built CONCURRENTLY: check none was left invalid
        assert index_validity(empty_db, NAMES) == dict.fromkeys(NAMES, True)
    command.downgrade(alembic_config(empty_db), "0004")
    assert not NAMES & job_indexes(empty_db)
    assert statistics(empty_db) == []
    upgrade(settings=empty_db)
    assert job_indexes(empty_db) >= NAMES


def test_0005_indexes_are_the_models() -> None:
    """Same names, columns and conditions in the model and the migration (autogenerate's
    comparison does not look at a partial index's condition)."""
    ours = [ix for ix in Job.__table_args__ if isinstance(ix, Index) and ix.name in NAMES]
    model = {
        str(ix.name): (
            [str(column.name) for column in ix.columns],
            str(ix.dialect_options["postgresql"]["where"]),
        )
        for ix in ours
    }
    assert model == {name: (cols, where) for name, cols, where in migration().INDEXES}
    for ix in ours:  # the same condition on SQLite
        where = ix.dialect_options["postgresql"]["where"]
        assert str(ix.dialect_options["sqlite"]["where"]) == str(where)
    # The suspect index's condition spells out the quarantine's threshold.
    assert model["ix_jobs_suspect_status_lease"][1].endswith(f">= {SUSPECT_AFTER_ATTEMPTS}")


def test_0005_runs_again_after_a_concurrent_build_failed(pg_db: Settings) -> None:
    # Regression: a CREATE INDEX CONCURRENTLY that failed or was cancelled left an INVALID index
    # of its name and the revision at 0004, and every retry failed on "relation already exists".
    upgrade(settings=pg_db, revision="0004")
    insert_jobs(pg_db, 2)
    # A first run built one index, then the next build failed.
    build_concurrently(
        pg_db,
        "CREATE INDEX CONCURRENTLY ix_jobs_running_lease ON jobs (lease_expires_at) "
        "WHERE status = 'running'",
    )
    fail_unique_build(pg_db, "ix_jobs_queued_created_at_id", on="jobs ((1))")
    assert index_validity(pg_db, NAMES) == {
        "ix_jobs_running_lease": True,
        "ix_jobs_queued_created_at_id": False,
    }
    upgrade(settings=pg_db)
    assert index_validity(pg_db, NAMES) == dict.fromkeys(NAMES, True)
    rebuilt = index_definitions(pg_db, NAMES)["ix_jobs_queued_created_at_id"]
    assert rebuilt.startswith("CREATE INDEX ")  # the migration's, not the failed unique one
    assert rebuilt.endswith("(created_at, id) WHERE ((status)::text = 'queued'::text)")


def test_0005_runs_again_after_it_was_stopped_before_its_revision_was_written(
    pg_db: Settings,
) -> None:
    upgrade(settings=pg_db, revision="0005")
    command.stamp(alembic_config(pg_db), "0004")  # every index built, the revision not moved
    upgrade(settings=pg_db, revision="0005")
    assert index_validity(pg_db, NAMES) == dict.fromkeys(NAMES, True)
    command.downgrade(alembic_config(pg_db), "0004")
    command.stamp(alembic_config(pg_db), "0005")  # every index dropped, the revision not moved
    command.downgrade(alembic_config(pg_db), "0004")
    assert index_validity(pg_db, NAMES) == {}
