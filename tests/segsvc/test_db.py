"""segsvc/db.py engines on real Postgres."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from segsvc.db import (
    DbRole,
    build_engine,
    get_engine,
    is_db_timeout,
    migration_limits,
    session_scope,
    statement_limits,
    with_db_role,
)
from segsvc.settings import Settings
from tests.conftest import postgres_database


def test_postgres_connections_detect_a_vanished_server(settings: Settings) -> None:
    # Regression: only connect_timeout was set, so a statement on a connection whose server
    # vanished hung for the kernel's ~15 minutes of retransmissions.
    with get_engine(settings).connect() as conn:
        params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    assert params["keepalives"] == "1"
    assert int(params["keepalives_idle"]) <= 60
    assert int(params["tcp_user_timeout"]) <= 120_000


@contextmanager
def holding(database_url: str, sql: str, *, seconds: float) -> Iterator[None]:
    """Run `sql` in a transaction of its own, keeping its locks until the `with` block ends or
    for `seconds` at most: a wait on them that no timeout cuts short ends then too, so a test
    of the old code fails instead of hanging. A test that needs the locks held until it has
    seen something lets go by leaving the block, with `seconds` a long safety net."""
    conn = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"))
    conn.execute(sql)
    timer = threading.Timer(seconds, conn.rollback)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a rollback it already started ends before the connection closes
        conn.rollback()
        conn.close()


def limited(settings: Settings, role: DbRole, **limits: float) -> Settings:
    """`settings` of a process serving as `role`, with these limits (seconds)."""
    return with_db_role(settings.model_copy(update=limits), role)


def test_statement_limits_follow_the_process_role() -> None:
    cfg = Settings(_env_file=None)
    # Migrations, the CLI, retraining: no limits, said explicitly (0) so that none set on the
    # database or its role applies.
    assert statement_limits(cfg) == {
        "statement_timeout": 0,
        "lock_timeout": 0,
        "idle_in_transaction_session_timeout": 0,
    }
    assert statement_limits(with_db_role(cfg, "api")) == {
        "statement_timeout": 10_000,
        "lock_timeout": 5_000,
        "idle_in_transaction_session_timeout": 120_000,
    }
    assert statement_limits(with_db_role(cfg, "worker"))["statement_timeout"] == 60_000
    tiny = limited(cfg, "api", api_statement_timeout_seconds=1e-4, db_lock_timeout_seconds=0)
    # A value that rounds to 0 ms still limits; 0 is no limit.
    assert statement_limits(tiny) == {
        "statement_timeout": 1,
        "lock_timeout": 0,
        "idle_in_transaction_session_timeout": 120_000,
    }


@pytest.mark.parametrize(
    ("role", "limit"),
    [("api", "api_statement_timeout_seconds"), ("worker", "worker_statement_timeout_seconds")],
)
def test_serving_roles_cancel_a_statement_past_their_timeout(
    settings: Settings, role: DbRole, limit: str
) -> None:
    engine = get_engine(limited(settings, role, **{limit: 0.2}))
    started = time.monotonic()
    with pytest.raises(OperationalError) as caught, engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(3)"))
    assert isinstance(caught.value.orig, psycopg.errors.QueryCanceled)
    assert is_db_timeout(caught.value)
    assert time.monotonic() - started < 2
    with engine.connect() as conn:  # the connection stays usable
        assert conn.scalar(text("SELECT 1")) == 1


def test_lock_wait_past_the_lock_timeout_is_a_db_timeout(settings: Settings) -> None:
    engine = get_engine(limited(settings, "worker", db_lock_timeout_seconds=0.2))
    assert settings.database_url is not None
    with holding(settings.database_url, "LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE", seconds=3):
        started = time.monotonic()
        with pytest.raises(OperationalError) as caught, engine.connect() as conn:
            conn.execute(text("SELECT count(*) FROM jobs"))
        assert time.monotonic() - started < 2
    assert isinstance(caught.value.orig, psycopg.errors.LockNotAvailable)
    assert is_db_timeout(caught.value)
    with pytest.raises(DBAPIError) as other, engine.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not is_db_timeout(other.value)


def test_admin_work_runs_past_the_serving_limits(settings: Settings) -> None:
    tight = {
        "api_statement_timeout_seconds": 0.1,
        "worker_statement_timeout_seconds": 0.1,
        "db_lock_timeout_seconds": 0.1,
        "db_idle_in_transaction_timeout_seconds": 0.1,
    }
    api = get_engine(limited(settings, "api", **tight))
    with pytest.raises(OperationalError), api.connect() as conn:
        conn.execute(text("SELECT pg_sleep(1)"))
    assert settings.database_url is not None
    # What migrations/env.py connects with: no statement limit, only a short lock wait.
    migrations = build_engine(settings.database_url, limits=migration_limits(settings))
    # The CLI and the maintenance tasks (role admin), and the migrations.
    for engine in (get_engine(settings.model_copy(update=tight)), migrations):
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(0.3)"))
            assert conn.scalar(text("SHOW statement_timeout")) == "0"
            assert conn.scalar(text("SHOW idle_in_transaction_session_timeout")) == "0"
            lock_wait = "2s" if engine is migrations else "0"
            assert conn.scalar(text("SHOW lock_timeout")) == lock_wait
    migrations.dispose()


def test_database_url_options_still_apply(settings: Settings) -> None:
    url = f"{settings.database_url}?options=-c%20lock_timeout%3D777"
    cfg = with_db_role(settings.model_copy(update={"database_url": url}), "api")
    with get_engine(cfg).connect() as conn:
        assert conn.scalar(text("SHOW statement_timeout")) == "10s"
        assert conn.scalar(text("SHOW lock_timeout")) == "777ms"  # the URL's own wins


def test_admin_work_is_unlimited_even_where_the_database_sets_limits() -> None:
    # Behind a pooler the docs advise limits on the database role (ALTER ROLE/DATABASE ... SET);
    # migrations and retraining must still run unbounded, and serving connections keep theirs.
    with postgres_database(f"segsvc_limits_{os.getpid()}") as url:
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET statement_timeout = '100ms'").format(
                    sql.Identifier(f"segsvc_limits_{os.getpid()}")
                )
            )
        cfg = Settings(database_url=url, _env_file=None)  # type: ignore[call-arg]
        migrations = build_engine(url)
        for engine in (get_engine(cfg), migrations):
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_sleep(0.3)"))
        migrations.dispose()
        with get_engine(with_db_role(cfg, "api")).connect() as conn:
            assert conn.scalar(text("SHOW statement_timeout")) == "10s"


@pytest.mark.parametrize("role", ["api", "worker", "admin"])
def test_every_connection_plans_statements_for_their_parameters(
    settings: Settings, role: str
) -> None:
    """psycopg prepares a statement after five runs on a connection; Postgres must still plan
    each run for its parameters, not fall back to one generic plan (which costs more with every
    dead row version of the jobs table: segsvc/db.py SESSION_SETTINGS)."""
    cfg = with_db_role(settings, role)  # type: ignore[arg-type]
    with get_engine(cfg).connect() as conn:
        assert conn.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
        for _ in range(10):
            conn.execute(
                text("SELECT status FROM jobs WHERE id = :id FOR UPDATE"), {"id": uuid.uuid4()}
            )
        generic, custom = conn.execute(
            text(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE 'SELECT status FROM jobs WHERE id = %'"
            )
        ).one()
    assert generic == 0
    assert custom >= 5  # prepared (parsed once), planned every time


def test_a_statements_error_does_not_carry_its_values(settings: Settings) -> None:
    """SQLAlchemy put a failed statement's values in its error, and so in the logged traceback
    (webhook URLs with credentials, key hashes). Postgres' own DETAIL may still quote a row."""
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError) as failed, session_scope(settings) as session:
        session.execute(
            text("SELECT 1 / 0 WHERE CAST(:url AS text) IS NOT NULL"),
            {"url": "https://user:s3cr3t@hooks.example/x"},
        )
    assert "division by zero" in str(failed.value)
    assert "s3cr3t" not in str(failed.value)


def test_threads_asking_at_once_share_one_engine(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh gunicorn worker's threads each built an engine for their first request; the
    ones overwritten kept their pools' connections, unseen by `dispose_engines`."""
    from segsvc import db

    url = f"{settings.database_url}?application_name=engine_race"  # a key no one has made
    cfg = settings.model_copy(update={"database_url": url})
    start = threading.Barrier(8)
    real_build = db.build_engine
    built: list[object] = []

    def slow_build(*args: object, **kwargs: object) -> object:
        built.append(1)
        time.sleep(0.05)  # as connecting takes a moment: the others ask meanwhile
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(db, "build_engine", slow_build)
    makers: list[object] = []

    def ask() -> None:
        start.wait(5)
        makers.append(db.get_sessionmaker(cfg))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(built) == 1
    assert len({id(m) for m in makers}) == 1
