"""Engine and session factory, one per process (re-created after a fork)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from segsvc.settings import Settings, get_settings

DbRole = Literal["admin", "api", "worker"]  # the values of Settings.db_role
# (pid, url, the role's limits): an API and an admin engine on one database are two pools.
EngineKey = tuple[int, str, tuple[tuple[str, int], ...]]

_engines: dict[EngineKey, Engine] = {}
_factories: dict[EngineKey, sessionmaker[Session]] = {}
# Made once per key: threads of a fresh gunicorn worker asking at once each built an engine,
# and the ones overwritten kept their pools' connections, unseen by `dispose_engines`.
_made = threading.Lock()


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; busy_timeout waits instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# libpq connection options. A database that vanishes without closing its connections (a host
# gone, a network partition) would otherwise hold a worker's statement for the kernel's default
# ~15 minutes of retransmissions while the worker still looks alive: TCP keepalives probe an idle
# connection after 30 s and give up after 3 unanswered probes 10 s apart, and unacknowledged
# writes give up after 60 s.
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}

# SQLSTATEs of a statement Postgres gave up on: query_canceled (statement_timeout, or an
# operator's pg_cancel_backend) and lock_not_available (lock_timeout, NOWAIT).
TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})


def with_db_role(settings: Settings, role: DbRole) -> Settings:
    """`settings` for a process serving as `role`: its Postgres connections get that role's
    limits (each entry point calls this once for the settings it hands out)."""
    return settings.model_copy(update={"db_role": role})


# Each limit, said explicitly even when off (0): a limit set on the database or its role
# (`ALTER ROLE ... SET statement_timeout`, as a pooler that drops startup options needs) must
# not reach admin work, and a serving role's 0 means no limit, not the role's.
NO_LIMITS = {"statement_timeout": 0, "lock_timeout": 0, "idle_in_transaction_session_timeout": 0}


def statement_limits(settings: Settings) -> dict[str, int]:
    """The Postgres timeouts (ms, 0: none) of the settings' role; none for `admin` work
    (migrations build indexes CONCURRENTLY, retraining exports every label: both may rightly
    run long)."""
    if settings.db_role == "admin":
        return dict(NO_LIMITS)
    statement = (
        settings.api_statement_timeout_seconds
        if settings.db_role == "api"
        else settings.worker_statement_timeout_seconds
    )
    seconds = {
        "statement_timeout": statement,
        "lock_timeout": settings.db_lock_timeout_seconds,
        "idle_in_transaction_session_timeout": settings.db_idle_in_transaction_timeout_seconds,
    }
    return {name: _ms(s) for name, s in seconds.items()}


def migration_limits(settings: Settings) -> dict[str, int]:
    """The Postgres timeouts (ms) of a migration's connection: no statement limit (an index
    build or a backfill may rightly run long), but a short wait for a lock. A step that needs
    a table lock (`ALTER TABLE`) queues behind a long transaction holding any lock on the table,
    and every request touching the table queues behind the step; giving up after
    `migration_lock_wait_per_try` and trying again later (`segsvc.migrate.upgrade`) keeps
    that stall short."""
    return {**NO_LIMITS, "lock_timeout": _ms(settings.migration_lock_wait_per_try)}


def _ms(seconds: float) -> int:
    # At least 1 ms: a value that rounds to 0 would mean "no limit" to Postgres.
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


def is_db_timeout(exc: BaseException) -> bool:
    """True for a statement Postgres cancelled at its statement or lock timeout."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in TIMEOUT_SQLSTATES


# Server settings of every connection, whatever its role. psycopg prepares a statement on the
# server once it has run five times on a connection, and Postgres then plans it once, for any
# parameters (a generic plan). For the updates of one job by id (the claim, the result write)
# that plan costs more with every dead row version the jobs table holds until vacuum: timed
# alone, a job's claim went from 0.15 ms (planned for its parameters) to 0.69 ms (generic) with
# 8,000 jobs' old versions in the table, and Postgres' CPU per job grew from 0.9 to 3.9 ms over
# 20,000 jobs, where it stayed at 1.0 without the generic plans. Statements stay prepared
# (parsed once) but are planned for their parameters every time.
SESSION_SETTINGS = {"plan_cache_mode": "force_custom_plan"}


def _postgres_connect_args(url: str, limits: Mapping[str, int]) -> dict[str, Any]:
    args: dict[str, Any] = dict(POSTGRES_CONNECT_ARGS)
    # libpq's startup `options`: set before the first statement, on every new connection.
    # connect_args replace a URL's own `?options=`, so that goes last (and wins).
    settings: dict[str, object] = {**SESSION_SETTINGS, **limits}
    ours = " ".join(f"-c {name}={value}" for name, value in settings.items())
    theirs = make_url(url).query.get("options", ())
    args["options"] = " ".join([ours, *((theirs,) if isinstance(theirs, str) else theirs)])
    return args


def build_engine(url: str, *, limits: Mapping[str, int] | None = None) -> Engine:
    """A new engine with settings suited to the dialect; on Postgres, `limits` are server
    settings (ms, e.g. `statement_timeout`) of each connection, by default none at all
    (`NO_LIMITS`: what admin work connects with). SQLite takes none."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True
        )
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,  # recover by itself after a Postgres restart
        pool_size=10,
        max_overflow=10,
        pool_recycle=1800,
        connect_args=_postgres_connect_args(url, NO_LIMITS if limits is None else limits),
        # A statement's error (logged with its traceback) leaves out the values it was given:
        # webhook URLs with their credentials, key hashes, signing secrets, uploads.
        hide_parameters=True,
    )


def _engine_key(settings: Settings) -> EngineKey:
    limits = () if is_sqlite(settings) else tuple(statement_limits(settings).items())
    return (os.getpid(), settings.sqlalchemy_url, limits)


def get_engine(settings: Settings | None = None) -> Engine:
    """The process's engine for the configured database, with its role's limits."""
    settings = settings or get_settings()
    key = _engine_key(settings)
    engine = _engines.get(key)
    if engine is None:
        with _made:
            engine = _engines.get(key)
            if engine is None:
                engine = _engines[key] = build_engine(key[1], limits=dict(key[2]))
    return engine


def get_sessionmaker(settings: Settings | None = None) -> sessionmaker[Session]:
    """The process's one sessionmaker (per role)."""
    settings = settings or get_settings()
    key = _engine_key(settings)
    factory = _factories.get(key)
    if factory is None:
        engine = get_engine(settings)
        with _made:
            factory = _factories.get(key)
            if factory is None:
                factory = _factories[key] = sessionmaker(engine, expire_on_commit=False)
    return factory


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session in a transaction: commit on success, roll back on error, always close."""
    session = get_sessionmaker(settings)()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


def savepoint(session: Session) -> AbstractContextManager[object]:
    """Where a statement may lose a unique index to a concurrent twin: a savepoint on Postgres,
    so the transaction stays usable after the IntegrityError. SQLite (pysqlite's savepoints are
    unreliable) takes one writer at a time; its loser's transaction ends with the error."""
    if session.get_bind().dialect.name == "postgresql":
        return session.begin_nested()
    return nullcontext()


def dispose_engines() -> None:
    """Close every pooled connection of this process (tests, shutdown)."""
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
    _factories.clear()


def is_sqlite(settings: Settings | None = None) -> bool:
    """True for the embedded default database."""
    return (settings or get_settings()).sqlalchemy_url.startswith("sqlite")
