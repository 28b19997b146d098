"""Migrations on a live database: a step that needs a table lock must not stall the requests
queued behind its wait, and two runs at once must not race each other."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError

from segsvc.db import build_engine, get_engine, is_db_timeout
from segsvc.migrate import MIGRATION_LOCK_KEY, MigrationLockError, alembic_config, upgrade
from segsvc.settings import Settings
from tests.conftest import postgres_database
from tests.segsvc.test_db import holding, limited

# A transaction reading the jobs table (a retraining export, a report) holds a lock that
# `ALTER TABLE jobs` (0004) must wait for.
LONG_READ = "SET application_name = 'long-report'; SELECT count(*) FROM jobs"


@pytest.fixture
def at_0003() -> Iterator[Settings]:
    """A Postgres database of its own at revision 0003, whose next step alters `jobs`."""
    with postgres_database(f"segsvc_migrate_locks_{os.getpid()}") as url:
        cfg = Settings(
            database_url=url,
            migration_lock_timeout_seconds=0.2,
            _env_file=None,  # type: ignore[call-arg]
        )
        upgrade(settings=cfg, revision="0003")
        yield cfg


def revision(cfg: Settings) -> str:
    engine = build_engine(cfg.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            return str(conn.scalar(text("SELECT version_num FROM alembic_version")))
    finally:
        engine.dispose()


def head(cfg: Settings) -> str:
    return str(ScriptDirectory.from_config(alembic_config(cfg)).get_current_head())


def job_columns(cfg: Settings) -> set[str]:
    engine = build_engine(cfg.sqlalchemy_url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()


def test_a_step_waiting_for_a_lock_backs_off_so_requests_go_on(at_0003: Settings) -> None:
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    failed: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(settings=at_0003, revision="0004", sleep=sleep)
        except BaseException as exc:
            failed.append(exc)

    api = limited(at_0003, "api", db_lock_timeout_seconds=2.0)
    waits: list[float] = []
    timeouts = 0
    # The report runs until the step has given up twice (or 20 s have passed): the test lets
    # go of its lock then, not at a set time.
    with holding(at_0003.sqlalchemy_url, LONG_READ, seconds=60):
        migration = threading.Thread(target=migrate)
        migration.start()
        ends = time.monotonic() + 20
        while len(pauses) < 2 and migration.is_alive() and time.monotonic() < ends:
            started = time.monotonic()  # a request while the report still runs
            try:
                with get_engine(api).connect() as conn:
                    conn.execute(text("SELECT count(*) FROM jobs"))
            except OperationalError as exc:
                if not is_db_timeout(exc):
                    raise
                timeouts += 1
            waits.append(time.monotonic() - started)
            time.sleep(0.02)
    migration.join(timeout=30)

    # Without the short lock wait the step queued for as long as the report ran, and every
    # request behind it waited out its own lock timeout (2 s) and failed; with it, a request
    # waits a step's try (0.2 s) at most.
    assert timeouts == 0
    assert max(waits) < 1.5
    assert len(pauses) >= 2  # it gave up and came back while the report held its lock
    assert not failed
    assert revision(at_0003) == "0004"  # then it went through
    assert {"releases", "first_released_at"} <= job_columns(at_0003)


def test_it_gives_up_in_the_end_naming_the_holder_and_the_next_run_resumes(
    at_0003: Settings,
) -> None:
    # The report reads model_versions, which 0006 alters; 0004 and 0005 need nothing it holds.
    report = "SET application_name = 'long-report'; SELECT count(*) FROM model_versions"
    short = at_0003.model_copy(update={"migration_lock_wait_seconds": 0.4})
    with (
        holding(at_0003.sqlalchemy_url, report, seconds=10),
        pytest.raises(MigrationLockError) as caught,
    ):
        upgrade(settings=short)
    message = str(caught.value)
    assert "long-report" in message
    assert "ALTER TABLE model_versions" in message
    assert is_db_timeout(caught.value.__cause__)  # type: ignore[arg-type]
    # Each step committed by itself: 0004 and 0005 stay, 0006 rolled back whole.
    assert revision(at_0003) == "0005"
    assert "releases" in job_columns(at_0003)
    upgrade(settings=at_0003)  # the next run picks up there
    assert revision(at_0003) == head(at_0003)


def test_a_run_gives_up_waiting_for_another_in_the_end_naming_it(at_0003: Settings) -> None:
    other = psycopg.connect(
        at_0003.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://"),
        autocommit=True,
        application_name="other-migration",
    )
    try:
        other.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        short = at_0003.model_copy(update={"migration_lock_wait_seconds": 1.5})
        with pytest.raises(MigrationLockError, match="other-migration"):
            upgrade(settings=short)
    finally:
        other.close()
    assert revision(at_0003) == "0003"


def test_two_runs_at_once_take_turns() -> None:
    with postgres_database(f"segsvc_migrate_twice_{os.getpid()}") as url:
        cfg = Settings(database_url=url, _env_file=None)  # type: ignore[call-arg]
        env = {**os.environ, "SEG_DATABASE_URL": url}
        command = [sys.executable, "-m", "segsvc.cli", "db", "upgrade"]
        runs = [
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(2)
        ]
        outputs = [run.communicate(timeout=180)[0].decode() for run in runs]
        # Racing, the second run's CREATE TABLE waited for the first's, then failed with
        # "relation already exists".
        assert [run.returncode for run in runs] == [0, 0], outputs
        assert revision(cfg) == head(cfg)


def test_the_command_says_why_it_stopped_in_one_line(at_0003: Settings) -> None:
    env = {
        **os.environ,
        "SEG_DATABASE_URL": at_0003.sqlalchemy_url,
        "SEG_MIGRATION_LOCK_TIMEOUT_SECONDS": "0.1",
        "SEG_MIGRATION_LOCK_WAIT_SECONDS": "0.3",
    }
    with holding(at_0003.sqlalchemy_url, LONG_READ, seconds=30):
        done = subprocess.run(
            [sys.executable, "-m", "segsvc.cli", "db", "upgrade"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert "Error: migration stopped: gave up after" in done.stderr
    assert "long-report" in done.stderr
    assert "Traceback" not in done.stderr


# The server's view of a run: its ALTER TABLE of 0004 queued for a lock, and the migration lock.
ALTER_QUEUED = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND query LIKE 'ALTER TABLE jobs%%' AND state = 'active'"
)
MIGRATION_LOCK_HELD = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid::bigint = %s"
)


@contextmanager
def upgrade_queued_behind_a_report(
    cfg: Settings,
) -> Iterator[tuple[subprocess.Popen[str], psycopg.Connection[Any]]]:
    """`segsvc db upgrade` in a process of its own, with no lock timeout, its ALTER TABLE queued
    behind a long report; and an admin connection to watch the server with."""
    url = cfg.sqlalchemy_url
    env = {**os.environ, "SEG_DATABASE_URL": url, "SEG_MIGRATION_LOCK_TIMEOUT_SECONDS": "0"}
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin, holding(url, LONG_READ, seconds=60):
        run = subprocess.Popen(
            [sys.executable, "-m", "segsvc.cli", "db", "upgrade"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while admin.execute(ALTER_QUEUED).fetchone() != (1,):
                assert time.monotonic() < deadline
                assert run.poll() is None
                time.sleep(0.1)
            yield run, admin
        finally:
            if run.poll() is None:
                run.kill()
            run.communicate(timeout=15)


def test_sigterm_cancels_the_statement_in_flight_and_lets_the_lock_go(at_0003: Settings) -> None:
    # Regression: killed by its Job's deadline, the run's ALTER TABLE stayed queued on the
    # server (every request on jobs behind it) with the migration lock held.
    with upgrade_queued_behind_a_report(at_0003) as (run, admin):
        run.terminate()
        _, stderr = run.communicate(timeout=15)
        assert run.returncode == 1
        assert "stopped by SIGTERM" in stderr
        assert admin.execute(ALTER_QUEUED).fetchone() == (0,)  # cancelled, not left queued
        assert admin.execute(MIGRATION_LOCK_HELD, (MIGRATION_LOCK_KEY,)).fetchone() == (0,)
    assert revision(at_0003) == "0003"


def test_upgrade_then_init_models_in_one_process(tmp_path: Path) -> None:
    """What the migrations Job and compose's `migrate` run, with no shell around it."""
    with postgres_database(f"segsvc_migrate_init_{os.getpid()}") as url:
        env = {**os.environ, "SEG_DATABASE_URL": url, "SEG_VAR_DIR": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-m", "segsvc.cli", "db", "upgrade", "--init-models"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "registered" in done.stdout
        engine = build_engine(url)
        try:
            with engine.connect() as conn:
                status = conn.scalar(text("SELECT status FROM model_versions"))
        finally:
            engine.dispose()
        assert status == "production"


def test_a_killed_run_leaves_no_statement_queued_on_the_server(at_0003: Settings) -> None:
    # SIGKILL (a stop's grace period over, an OOM kill) gives the CLI no chance to cancel: the
    # server notices the client is gone by itself (client_connection_check_interval).
    with upgrade_queued_behind_a_report(at_0003) as (run, admin):
        run.kill()
        run.wait(timeout=10)
        gone_by = time.monotonic() + 10  # the check runs every 2 s
        while admin.execute(ALTER_QUEUED).fetchone() != (0,):
            assert time.monotonic() < gone_by, "the killed run's ALTER TABLE is still queued"
            time.sleep(0.2)
        assert admin.execute(MIGRATION_LOCK_HELD, (MIGRATION_LOCK_KEY,)).fetchone() == (0,)
    assert revision(at_0003) == "0003"
