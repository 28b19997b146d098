"""Migrations run without the API's and the workers' statement limits, and their concurrent
index builds without the migration's own short lock wait."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from segsvc.db import get_engine, is_db_timeout, with_db_role
from segsvc.migrate import upgrade
from segsvc.settings import Settings
from tests.conftest import postgres_database
from tests.segsvc.test_db import holding


def test_migrations_wait_out_writers_past_the_serving_limits() -> None:
    # 0003 builds its indexes CONCURRENTLY, which waits for every transaction writing the table
    # (a submit in flight). Under the API's limits that wait would fail the release.
    with postgres_database(f"segsvc_limits_{os.getpid()}") as url:
        cfg = Settings(
            database_url=url,
            api_statement_timeout_seconds=0.2,
            db_lock_timeout_seconds=0.2,
            # A concurrent build waits out writers past the migration's own short lock wait
            # too, with no retry to hide a give-up: that wait blocks no one.
            migration_lock_timeout_seconds=0.1,
            migration_lock_wait_seconds=0,
            _env_file=None,
        )
        api = with_db_role(cfg, "api")  # even with the API's settings
        upgrade(settings=api, revision="0002")
        with ThreadPoolExecutor(1) as pool:
            with holding(url, "LOCK TABLE jobs IN ROW EXCLUSIVE MODE", seconds=60):
                with pytest.raises(OperationalError) as caught, get_engine(api).connect() as conn:
                    conn.execute(text("LOCK TABLE jobs IN SHARE MODE"))  # the API gives up...
                assert is_db_timeout(caught.value)
                migrating = pool.submit(upgrade, settings=api, revision="0003")
                # ... the migration waits for the writer, well past its own lock wait (0.1 s)
                # and the API's limits (0.2 s)
                wait([migrating], timeout=1.0)
                assert not migrating.done(), migrating.exception()
            migrating.result(timeout=30)  # the writer gone, it goes through
