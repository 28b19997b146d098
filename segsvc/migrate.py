"""Run Alembic programmatically with the project's config.

A migration step that needs a table lock gives up after `migration_lock_wait_per_try`
(`segsvc.db.migration_limits`) so that the requests queued behind its wait go on; `upgrade`
then tries again, backing off, for up to `migration_lock_wait_seconds`. Each step commits by
itself, so a retry resumes at the step that gave up.
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from collections.abc import Callable
from typing import TextIO

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from segsvc.db import build_engine, is_sqlite
from segsvc.settings import ROOT, Settings, get_settings

log = logging.getLogger(__name__)

LOCK_NOT_AVAILABLE = "55P03"  # Postgres' SQLSTATE for a lock_timeout
# The Postgres advisory lock that lets one migration run at a time on a database
# (migrations/env.py): a second `segsvc db upgrade` (a retried Job, an operator by hand) waits
# for the first, then finds the schema at head, instead of racing it through the same steps.
MIGRATION_LOCK_KEY = zlib.crc32(b"segsvc.migrate")
MAX_PAUSE_S = 10.0


class MigrationLockError(RuntimeError):
    """A migration step could not get its lock within `migration_lock_wait_seconds`."""


def alembic_config(settings: Settings | None = None) -> Config:
    """The project's Alembic config pointed at the settings' database."""
    settings = settings or get_settings()
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", settings.sqlalchemy_url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    cfg.attributes["settings"] = settings
    return cfg


def upgrade(
    *,
    revision: str = "head",
    settings: Settings | None = None,
    sleep: Callable[[float], object] = time.sleep,
) -> None:
    """Bring the schema to `revision`, retrying a step that gave up waiting for a lock."""
    settings = settings or get_settings()
    if settings.migration_lock_wait_per_try != settings.migration_lock_timeout_seconds:
        log.warning(
            "SEG_MIGRATION_LOCK_TIMEOUT_SECONDS (%g) is not below the API's and the workers' "
            "lock wait (%g s): each try waits %g s instead, so requests queued behind it go on",
            settings.migration_lock_timeout_seconds,
            settings.serving_lock_wait_seconds,
            settings.migration_lock_wait_per_try,
        )
    started = time.monotonic()
    deadline = started + settings.migration_lock_wait_seconds
    tries = 0
    while True:
        tries += 1
        try:
            command.upgrade(alembic_config(settings), revision)
            return
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            step = " ".join(str(exc.statement or "").split())[:120]
            holders = oldest_transactions(settings)
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationLockError(
                    f"gave up after {tries} tries in {time.monotonic() - started:.1f} s "
                    f"(SEG_MIGRATION_LOCK_WAIT_SECONDS): `{step}` could not get its lock; "
                    f"oldest open transactions: {holders}"
                ) from exc
            # Exponential with jitter, so that retries do not line up with the holder's own
            # rhythm (a job that holds a lock for 1 s every 2 s).
            pause = min(left, MAX_PAUSE_S, 0.5 * 2 ** min(tries - 1, 8)) * random.uniform(0.5, 1)
            log.warning(
                "migration step `%s` waited %g s for a lock and gave up (try %d); "
                "trying again in %.1f s; oldest open transactions: %s",
                step,
                settings.migration_lock_wait_per_try,
                tries,
                pause,
                holders,
            )
            sleep(pause)


def sql_script(
    *,
    out: TextIO,
    revision: str = "head",
    from_revision: str | None = None,
    settings: Settings | None = None,
) -> None:
    """Write the SQL of the steps from `from_revision` (None: an empty database) up to
    `revision` to `out`, connecting to nothing (Alembic's offline mode): a script for a
    reviewer, or for a DBA who applies changes by hand. Postgres only: SQLite's steps rebuild
    tables from what they find, which a script cannot read."""
    settings = settings or get_settings()
    if is_sqlite(settings):
        raise ValueError(
            "a SQL script is written for Postgres (SEG_DATABASE_URL); a SQLite database "
            "migrates with `segsvc db upgrade`"
        )
    cfg = alembic_config(settings)
    if from_revision and _is_below(cfg, revision, from_revision):
        # Alembic writes an empty script for it: an upgrade never goes back, and says so.
        raise ValueError(
            f"{revision} is older than {from_revision}: an upgrade never goes back (a "
            "downgrade script is `alembic downgrade FROM:TO --sql`)"
        )
    cfg.output_buffer = out
    command.upgrade(cfg, f"{from_revision}:{revision}" if from_revision else revision, sql=True)


def _is_below(cfg: Config, revision: str, than: str) -> bool:
    """Whether `revision` is an ancestor of `than` (unknown ones: left to Alembic to name)."""
    from alembic.script import ScriptDirectory
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    scripts = ScriptDirectory.from_config(cfg)
    try:
        target = scripts.get_revision(revision)
        ancestors = {rev.revision for rev in scripts.iterate_revisions(than, "base")}
    except (CommandError, RevisionError):
        return False
    return target is not None and target.revision in ancestors and target.revision != than


def current_revisions(settings: Settings | None = None) -> tuple[str, ...]:
    """The revisions the database's `alembic_version` holds (empty: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = build_engine((settings or get_settings()).sqlalchemy_url)
    try:
        with engine.connect() as conn:
            return tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
    finally:
        engine.dispose()


def oldest_transactions(settings: Settings, limit: int = 3) -> str:
    """The database's oldest open transactions, the likely holders of a lock a step waited
    for: pid, application, age and statement of each (Postgres)."""
    if is_sqlite(settings):
        return "-"
    engine = build_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid, application_name, state,"
                    " extract(epoch FROM now() - xact_start) AS age, query"
                    " FROM pg_stat_activity"
                    " WHERE datname = current_database() AND xact_start IS NOT NULL"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                    " ORDER BY xact_start LIMIT :n"
                ),
                {"n": limit},
            ).all()
    except DBAPIError as exc:
        return f"(could not list them: {exc.orig})"
    finally:
        engine.dispose()
    if not rows:
        return "none now"
    return "; ".join(
        f"pid {r.pid} ({r.application_name or '-'}, {r.state}, open {r.age:.1f} s): "
        f"{' '.join(str(r.query).split())[:80]}"
        for r in rows
    )
