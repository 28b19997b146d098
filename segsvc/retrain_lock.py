"""The one retraining lock: at most one run at a time, and a run's unregistered candidate file
safe from the model-file pruner (`segsvc.services.model_files`), which holds it too."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from segsvc.db import get_engine, is_sqlite
from segsvc.files import try_lock
from segsvc.settings import Settings

RETRAIN_LOCK_KEY = zlib.crc32(b"segsvc.retrain")  # the Postgres advisory lock id of retraining


@contextmanager
def retrain_lock(settings: Settings) -> Iterator[bool]:
    """Yield True while this process holds the one retraining lock, False if another does."""
    if is_sqlite(settings):  # the embedded default runs on one machine: a file lock will do
        path = settings.var_dir / "retrain.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with try_lock(path) as acquired:
            yield acquired
        return
    # A session-level advisory lock on a connection held for the run: Postgres frees it by
    # itself if this process dies, so a crash never wedges retraining.
    engine = get_engine(settings)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        key = {"k": RETRAIN_LOCK_KEY}
        got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), key))
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), key)
