"""Migration 0005: the reconciler's partial indexes (and, on Postgres, the statistics that let
the planner pick the suspect index), up and down, matching the model."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from alembic import command
from sqlalchemy import Index, inspect, text

from segsvc.db import get_engine
from segsvc.migrate import alembic_config, upgrade
from segsvc.models import Job
from segsvc.services.reconcile import SUSPECT_AFTER_ATTEMPTS
from segsvc.settings import Settings
from tests.conftest import ROOT, postgres_database

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


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """A database of its own with no schema yet: a throwaway Postgres one, or SQLite."""
    if request.param == "sqlite":
        yield Settings(var_dir=tmp_path, _env_file=None)
        return
    with postgres_database(f"segsvc_migrate_0005_{os.getpid()}") as url:
        yield Settings(database_url=url, _env_file=None)


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
        with get_engine(empty_db).connect() as conn:
            valid = conn.execute(
                text(
                    "SELECT c.relname, i.indisvalid FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY(:names)"
                ),
                {"names": sorted(NAMES)},
            ).all()
        assert sorted(valid) == [(name, True) for name in sorted(NAMES)]
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
