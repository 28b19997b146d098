"""Fixtures of the migration tests: databases of their own with no schema yet."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from segsvc.settings import Settings
from tests.conftest import postgres_database


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """A database of its own with no schema yet: a throwaway Postgres one, or SQLite."""
    if request.param == "sqlite":
        yield Settings(var_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
        return
    with postgres_database(f"segsvc_migrate_{os.getpid()}") as url:
        yield Settings(database_url=url, _env_file=None)  # type: ignore[call-arg]


@pytest.fixture
def pg_db() -> Iterator[Settings]:
    """A throwaway Postgres database with no schema yet (for CONCURRENTLY builds)."""
    with postgres_database(f"segsvc_migrate_pg_{os.getpid()}") as url:
        yield Settings(database_url=url, _env_file=None)  # type: ignore[call-arg]
