"""The one retraining lock: at most one run at a time, and a run's unregistered candidate file
safe from the model-file pruner (`segsvc.services.model_files`), which holds it too."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from sqlalchemy import text
from sqlalchemy.orm import Session

from segsvc.db import get_engine, is_sqlite
from segsvc.files import try_lock
from segsvc.settings import Settings

RETRAIN_LOCK_KEY = zlib.crc32(b"segsvc.retrain")  # the Postgres advisory lock id of retraining
# Who holds the advisory lock: pg_advisory_lock(bigint) files its key as classid (the high 32
# bits: 0, a crc32 is below 2**32), objid (the low 32 bits) and objsubid 1. pg_locks lists the
# whole cluster's locks, and advisory locks are per database: another database's (another
# deployment's, another test process's) retraining is not this one's.
_HOLDERS = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = 0 AND objsubid = 1 AND objid = CAST(CAST(:k AS bigint) AS oid)"
)


class Held:
    """What `retrain_lock` yields: true while this process got the lock. `still_held()` asks
    again: the lock lives as long as its database session, which a Postgres restart, a
    failover or a dropped connection ends mid-run, freeing it for another run."""

    def __init__(self, acquired: bool, check: Callable[[], bool]) -> None:
        self.acquired = acquired
        self._check = check

    def __bool__(self) -> bool:
        return self.acquired

    def still_held(self) -> bool:
        if not self.acquired:
            return False
        try:
            return self._check()
        except Exception:  # the lock's connection is gone, and the lock with it
            return False


@contextmanager
def retrain_lock(settings: Settings) -> Iterator[Held]:
    """Yield a true `Held` while this process holds the one retraining lock, a false one if
    another does."""
    if is_sqlite(settings):  # the embedded default runs on one machine: a file lock will do
        path = settings.var_dir / "retrain.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with try_lock(path) as acquired:
            yield Held(acquired, lambda: True)
        return
    # A session-level advisory lock on a connection held for the run: Postgres frees it by
    # itself if this process dies, so a crash never wedges retraining.
    engine = get_engine(settings)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        key = {"k": RETRAIN_LOCK_KEY}
        got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), key))

        def check() -> bool:
            held = conn.scalar(text(f"{_HOLDERS} AND pid = pg_backend_pid()"), key)
            return bool(held)

        try:
            yield Held(got, check)
        finally:
            if got:
                # A connection that died took the lock with it: nothing left to unlock.
                with suppress(Exception):
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), key)


def retrain_lock_taken(settings: Settings, session: Session | None = None) -> bool:
    """Whether any process (this one included) holds the retraining lock now: a run, or the
    model-file pruner for a moment. A `running` training run with no holder is one whose
    process died (an OOM-killed worker): nothing will ever end its row but the next run.

    On Postgres it is read from `pg_locks` (on `session`'s connection when given), taking
    nothing. On SQLite the file lock is tried without blocking and let go at once: a run
    starting in that instant is refused as if another ran, as it is by the pruner's own try.
    """
    if is_sqlite(settings):
        with try_lock(settings.var_dir / "retrain.lock", create=False) as free:
            return not free  # no file: no run ever took it here
    key = {"k": RETRAIN_LOCK_KEY}
    if session is not None:
        return bool(session.scalar(text(_HOLDERS), key))
    with get_engine(settings).connect() as conn:
        return bool(conn.scalar(text(_HOLDERS), key))
