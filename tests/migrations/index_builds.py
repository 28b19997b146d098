"""Helpers for the migrations' re-run tests: what a failed CREATE INDEX CONCURRENTLY leaves."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from segsvc.db import get_engine
from segsvc.settings import Settings


def insert_jobs(settings: Settings, count: int, *, idempotency_key: str | None = None) -> None:
    """`count` queued anonymous jobs with only the columns every revision has."""
    with get_engine(settings).begin() as conn:
        for _ in range(count):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, status, created_at, attempts, cancel_requested, "
                    "idempotency_key, input_sha256, input_content_type, input_width, "
                    "input_height) VALUES (:id, 'queued', '2026-11-26 10:00:00+00', 2, false, "
                    ":key, '0', 'image/png', 1, 1)"
                ),
                {"id": uuid.uuid4(), "key": idempotency_key},
            )


def build_concurrently(settings: Settings, statement: str) -> None:
    """Run a CREATE INDEX CONCURRENTLY (outside any transaction), as a migration does."""
    with get_engine(settings).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(statement))


def fail_unique_build(settings: Settings, name: str, on: str) -> None:
    """A unique CREATE INDEX CONCURRENTLY `name` that fails on duplicates: the index stays,
    INVALID, under that name (as after a cancelled or killed build)."""
    with pytest.raises(IntegrityError):
        build_concurrently(settings, f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON {on}")


def index_validity(settings: Settings, names: set[str]) -> dict[str, bool]:
    """Each of `names` that exists, and whether Postgres may use it (`indisvalid`)."""
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname, i.indisvalid FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY(:names)"
            ),
            {"names": sorted(names)},
        ).all()
    return {str(name): bool(valid) for name, valid in rows}


def index_definitions(settings: Settings, names: set[str]) -> dict[str, str]:
    """`pg_indexes.indexdef` of each of `names`."""
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE indexname = ANY(:names)"),
            {"names": sorted(names)},
        ).all()
    return {str(name): str(definition) for name, definition in rows}
