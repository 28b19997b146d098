"""segsvc/retrain_lock.py: on the embedded SQLite default a file lock in var_dir (the Postgres
advisory lock is tested with the pipeline, tests/retrain/test_pipeline.py), and whether any
process holds the lock now, on either."""

from __future__ import annotations

from pathlib import Path

import psycopg

from segsvc.db import session_scope
from segsvc.retrain_lock import RETRAIN_LOCK_KEY, retrain_lock, retrain_lock_taken
from segsvc.settings import Settings
from tests.conftest import PG_ADMIN


def test_retrain_lock_on_sqlite_is_one_file_lock_in_var_dir(tmp_path: Path) -> None:
    cfg = Settings(var_dir=tmp_path / "var", _env_file=None)  # type: ignore[call-arg]
    with retrain_lock(cfg) as first:
        assert first
        assert (cfg.var_dir / "retrain.lock").is_file()
        with retrain_lock(cfg) as second:
            assert not second
    with retrain_lock(cfg) as again:
        assert again


def test_whether_the_lock_is_taken_on_sqlite_is_asked_without_keeping_it(tmp_path: Path) -> None:
    cfg = Settings(var_dir=tmp_path / "var", _env_file=None)  # type: ignore[call-arg]
    assert not retrain_lock_taken(cfg)  # no run ever took it: no file, and none made
    assert not (cfg.var_dir / "retrain.lock").exists()
    with retrain_lock(cfg) as held:
        assert held
        assert retrain_lock_taken(cfg)
    assert not retrain_lock_taken(cfg)
    with retrain_lock(cfg) as again:  # the question took nothing it kept
        assert again


def test_whether_the_lock_is_taken_on_postgres_is_read_from_pg_locks(
    settings: Settings,
) -> None:
    """Any connection's advisory lock on the key counts (another process's run), a lock on
    the same key in another database (another deployment on the cluster) does not."""
    url = (settings.database_url or "").replace("postgresql+psycopg://", "postgresql://")
    assert not retrain_lock_taken(settings)
    with psycopg.connect(url, autocommit=True) as other:  # as another process's run holds it
        assert other.execute("SELECT pg_try_advisory_lock(%s)", (RETRAIN_LOCK_KEY,)).fetchone()
        assert retrain_lock_taken(settings)
        with session_scope(settings) as session:
            assert retrain_lock_taken(settings, session)
        other.execute("SELECT pg_advisory_unlock(%s)", (RETRAIN_LOCK_KEY,))
        assert not retrain_lock_taken(settings)
    with retrain_lock(settings) as held:
        assert held
        assert retrain_lock_taken(settings)
    assert not retrain_lock_taken(settings)
    with psycopg.connect(PG_ADMIN, autocommit=True) as elsewhere:
        elsewhere.execute("SELECT pg_advisory_lock(%s)", (RETRAIN_LOCK_KEY,))
        try:
            assert not retrain_lock_taken(settings)
        finally:
            elsewhere.execute("SELECT pg_advisory_unlock(%s)", (RETRAIN_LOCK_KEY,))
