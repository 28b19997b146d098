"""Operations migrations share: blocks outside the step's transaction that wait for locks as long
as it takes (0003, 0005, 0007), the helpers of CONCURRENTLY index builds (0003, 0005, 0009,
0011), and what the steps that read the database do instead when Alembic writes a SQL script
(`segsvc db upgrade --sql`: `offline()`, `note()`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import context, op

# An index a migration builds: (name, table, columns, `create_index` keywords).
IndexSpec = tuple[str, str, list[str], dict[str, Any]]


def partial_where(condition: str) -> dict[str, sa.TextClause]:
    """`create_index` keywords for a partial index on both backends."""
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


def offline() -> bool:
    """Whether this run writes a SQL script (`alembic upgrade --sql`) instead of running it: a
    step can read nothing then, so one that decides by what it finds says it in SQL."""
    return context.is_offline_mode()


def note(text: str) -> None:
    """A comment in the SQL script, for the person who reviews and runs it."""
    impl = op.get_context().impl
    for line in text.splitlines():
        impl.static_output(f"-- {line}".rstrip())


@contextmanager
def patient_block() -> Iterator[None]:
    """Alembic's autocommit block, without the short lock wait of the transactional steps
    (`segsvc.db.migration_limits`), for work whose lock waits hold up no one's reads and writes:
    CREATE / DROP INDEX CONCURRENTLY, which waits for every older transaction writing the table
    while holding only SHARE UPDATE EXCLUSIVE, and batched backfills, which wait for the rows
    of one batch (a give-up there would start the walk over on the retry)."""
    ctx = op.get_context()
    postgres = ctx.dialect.name == "postgresql"
    with ctx.autocommit_block():
        if postgres:
            op.execute("SET lock_timeout = 0")
        try:
            yield
        finally:
            # On a connection a cancel or a disconnect ended, the RESET would fail and hide
            # that error (SIGTERM's one-line exit included); the session goes with it anyway.
            if postgres and (context.is_offline_mode() or not op.get_bind().invalidated):
                op.execute("RESET lock_timeout")  # the connection's own (its startup options)


def drop_invalid_indexes(names: Sequence[str]) -> None:
    """Drop the INVALID indexes among `names` that a failed or cancelled CREATE INDEX
    CONCURRENTLY left behind (Postgres; in an autocommit block): IF NOT EXISTS would keep
    them, unusable, for ever. A SQL script cannot look: it says so in a comment (a script runs
    once, on a database no failed build of these indexes touched)."""
    if offline():
        if op.get_context().dialect.name == "postgresql":
            note(
                "If an earlier CREATE INDEX CONCURRENTLY of these indexes was interrupted, drop "
                f"its INVALID leftover first (IF NOT EXISTS keeps it): {', '.join(names)}"
            )
        return
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    invalid = bind.scalars(
        sa.text(
            "SELECT name FROM unnest(CAST(:names AS text[])) AS name "
            "JOIN pg_index ON indexrelid = to_regclass(quote_ident(name)) WHERE NOT indisvalid"
        ),
        {"names": list(names)},
    ).all()
    for name in invalid:
        op.drop_index(name, postgresql_concurrently=True, if_exists=True)


def create_indexes_concurrently(indexes: Sequence[IndexSpec]) -> None:
    """Build `indexes` CONCURRENTLY (writes go on meanwhile), re-runnable: one left INVALID by
    an interrupted build is dropped and built again, one already there is kept."""
    with patient_block():
        drop_invalid_indexes([name for name, *_ in indexes])
        for name, table, columns, keywords in indexes:
            op.create_index(
                name, table, columns, postgresql_concurrently=True, if_not_exists=True, **keywords
            )


def drop_indexes_concurrently(indexes: Sequence[IndexSpec]) -> None:
    """Drop `indexes` CONCURRENTLY, in reverse order, those already gone skipped."""
    with patient_block():
        for name, table, _columns, _keywords in reversed(indexes):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
