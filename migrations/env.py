"""Alembic environment: the URL comes from segsvc settings (or `-x url=...`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from segsvc.db import build_engine, migration_limits
from segsvc.migrate import MIGRATION_LOCK_KEY, MigrationLockError
from segsvc.models import Base
from segsvc.settings import Settings, get_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
log = logging.getLogger("segsvc.migrate")

LOCK_POLL_S = 1.0
CLIENT_CHECK_MS = 2000
LOCK_SAY_EVERY_S = 30.0


def settings() -> Settings:
    """The settings `segsvc.migrate` passed, else the process's."""
    given: Settings | None = config.attributes.get("settings")
    return given or get_settings()


def database_url() -> str:
    """`-x url=...`, an explicit `sqlalchemy.url`, or the settings."""
    x_args = context.get_x_argument(as_dictionary=True)
    return (
        x_args.get("url")
        or config.get_main_option("sqlalchemy.url")
        or (get_settings().sqlalchemy_url)
    )


def run_migrations_offline() -> None:
    """Write the steps as a SQL script (`segsvc db upgrade --sql`), each in its own transaction
    as when run here; CONCURRENTLY index builds between them, outside any."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        transaction_per_migration=True,
    )
    context.get_context().impl.static_output(OFFLINE_HEADER)
    with context.begin_transaction():
        context.run_migrations()


OFFLINE_HEADER = """\
-- segsvc schema migration script, written by `segsvc db upgrade --sql` (Alembic offline mode).
-- Run it with psql, not in one transaction (CREATE INDEX CONCURRENTLY runs outside any):
--   psql -v ON_ERROR_STOP=1 -f this.sql "$DATABASE_URL"
-- The API and workers may keep serving meanwhile, as for `segsvc db upgrade`, but that command
-- also waits its turn behind other migrations and retries a step that waits too long for a
-- lock; this script does neither: run it once, when nothing else migrates this database.
-- No statement limit, as `segsvc db upgrade` sets none (a role's or a pooler's limit would
-- cancel a backfill, or a CONCURRENTLY build, leaving an INVALID index behind).
SET statement_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
"""


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # the caller's, maybe inside its own transaction
        _run(connection, serialize=False)
        return
    engine = build_engine(database_url(), limits=migration_limits(settings()))
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()  # a try that gave up keeps no connection open while the next waits


def _run(connection: Connection, *, serialize: bool = True) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # Each step commits by itself: a step that gives up waiting for a lock rolls back alone,
        # and the retry resumes there; no step holds the locks of the ones before it.
        transaction_per_migration=True,
    )
    if serialize:
        notice_if_killed(connection)
    serial = one_migration_at_a_time(connection) if serialize else nullcontext()
    with serial, sqlite_foreign_keys_off(connection), context.begin_transaction():
        context.run_migrations()


@contextmanager
def sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """On SQLite, no foreign-key actions while the steps run, then a check that every reference
    still holds. A batch step rebuilds a table (copy, DROP, rename), and with foreign keys on
    (as segsvc's connections set them) the DROP of `jobs` deleted every feedback and webhook
    row of its jobs through their ON DELETE CASCADE. SQLite ignores the pragma inside a
    transaction, so it is set before the first step's begins (its documented procedure)."""
    if connection.dialect.name != "sqlite":
        yield
        return
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        yield
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
        if broken:
            raise RuntimeError(f"migrations left references to missing rows: {broken[:5]}")
    finally:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def notice_if_killed(connection: Connection) -> None:
    """Have Postgres (14+) check every few seconds, while a statement runs or waits for a lock,
    that this process is still there. Killed outright (SIGKILL after a stop's grace period, an
    OOM kill, a lost node), a run otherwise left its statement going: an ALTER TABLE queued for
    its lock, holding up every request behind it, and the migration lock held, until the
    statement ended by itself. SIGTERM is handled by the CLI, which cancels the statement."""
    version = connection.dialect.server_version_info or (0,)
    if connection.dialect.name != "postgresql" or version < (14,):
        return
    connection.exec_driver_sql(f"SET client_connection_check_interval = {CLIENT_CHECK_MS}")
    connection.commit()  # a session setting: it outlives this transaction


@contextmanager
def one_migration_at_a_time(connection: Connection) -> Iterator[None]:
    """Hold the migration lock (Postgres; SQLite serializes writers by itself) for the run,
    waiting for another run as long as it takes: it does the same work."""
    if connection.dialect.name != "postgresql":
        yield
        return
    key = {"k": MIGRATION_LOCK_KEY}
    patience = settings().migration_lock_wait_seconds
    started = time.monotonic()
    said = -math.inf
    # Polled, not waited for in pg_advisory_lock: a waiting statement holds a snapshot, and the
    # other run's CREATE INDEX CONCURRENTLY waits for every older snapshot: a deadlock.
    while not connection.scalar(text("SELECT pg_try_advisory_lock(:k)"), key):
        holder = connection.execute(
            text(
                "SELECT a.pid, a.application_name, a.client_addr,"
                " extract(epoch FROM now() - a.backend_start) AS age"
                " FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0"
                " AND l.objid::bigint = :k AND l.objsubid = 1"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            key,
        ).first()
        connection.rollback()
        who = (
            f"pid {holder.pid} ({holder.application_name or '-'}, {holder.client_addr or 'local'},"
            f" connected {holder.age:.0f} s)"
            if holder
            else "a session that just let go"
        )
        waited = time.monotonic() - started
        if waited >= patience:
            raise MigrationLockError(
                f"another migration ({who}) held the migration lock for the whole "
                f"{patience:g} s of SEG_MIGRATION_LOCK_WAIT_SECONDS"
            )
        if waited - said >= LOCK_SAY_EVERY_S:
            log.warning("waiting for another migration on this database to finish: %s", who)
            said = waited
        time.sleep(LOCK_POLL_S)
    connection.commit()  # a session lock: it outlives this transaction and the steps' own
    try:
        yield
    finally:
        # A failed release must not hide what failed the run (a lock timeout to retry, say):
        # the lock goes with the session anyway, which `engine.dispose()` ends.
        with suppress(DBAPIError):
            if not connection.invalidated:
                connection.rollback()  # a step that failed may have left its transaction open
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), key)
                connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
