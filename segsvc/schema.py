"""Which schema revision this release's code needs, read from `migrations/versions/` without
importing Alembic (the API checks it on every readiness probe, and stays light)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from segsvc.settings import ROOT

VERSIONS = ROOT / "migrations" / "versions"
_REVISION = re.compile(r"^revision(?::\s*\w+)?\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN = re.compile(r"^down_revision(?::[^=]+)?\s*=\s*(?:None|['\"]([^'\"]+)['\"])", re.MULTILINE)


@functools.cache
def code_revisions(versions: Path = VERSIONS) -> tuple[frozenset[str], frozenset[str]]:
    """(every revision this release's migrations know, the heads among them). Empty when the
    migrations are not beside the code (the check is then not made)."""
    known: set[str] = set()
    parents: set[str] = set()
    for script in versions.glob("*.py"):
        text = script.read_text()
        found = _REVISION.search(text)
        if found is None:
            continue
        known.add(found.group(1))
        down = _DOWN.search(text)
        if down is not None and down.group(1):
            parents.add(down.group(1))
    return frozenset(known), frozenset(known - parents)


def schema_behind(database: set[str], versions: Path = VERSIONS) -> str | None:
    """Why this release cannot serve on a database at revisions `database` (`alembic_version`):
    a schema behind its code, whose missing columns would fail requests. None when the schema
    is at the code's head, or ahead of it (a newer release migrated it first: migrations keep
    the previous release working, so pods of the old one stay ready through a rollout)."""
    known, heads = code_revisions(versions)
    if not heads or database == heads:
        return None
    if database and not database <= known:
        return None  # a revision this release does not know: a newer one's
    at = ", ".join(sorted(database)) or "none"
    return (
        f"database schema at {at}, this release needs {', '.join(sorted(heads))} "
        "(run `segsvc db upgrade`)"
    )
