"""Engine and session factory, one per process (re-created after a fork)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from segsvc.settings import Settings, get_settings

_engines: dict[tuple[int, str], Engine] = {}
_factories: dict[tuple[int, str], sessionmaker[Session]] = {}


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


def build_engine(url: str) -> Engine:
    """A new engine with settings suited to the dialect."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,  # recover by itself after a Postgres restart
        pool_size=10,
        max_overflow=10,
        pool_recycle=1800,
        connect_args=POSTGRES_CONNECT_ARGS,
    )


def get_engine(settings: Settings | None = None) -> Engine:
    """The process's engine for the configured database."""
    url = (settings or get_settings()).sqlalchemy_url
    key = (os.getpid(), url)
    if key not in _engines:
        _engines[key] = build_engine(url)
    return _engines[key]


def get_sessionmaker(settings: Settings | None = None) -> sessionmaker[Session]:
    """The process's one sessionmaker."""
    url = (settings or get_settings()).sqlalchemy_url
    key = (os.getpid(), url)
    if key not in _factories:
        _factories[key] = sessionmaker(get_engine(settings), expire_on_commit=False)
    return _factories[key]


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
