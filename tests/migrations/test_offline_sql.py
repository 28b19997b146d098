"""`segsvc db upgrade --sql`: the migrations as a SQL script (Alembic's offline mode), which a
DBA reviews and applies with psql. Applied, it must build what the live upgrade builds, and move
the data the live steps move (0006's kept timestamps, 0007's cleared model inputs)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy import select, text

from segsvc.cli import main
from segsvc.db import get_engine, session_scope
from segsvc.migrate import alembic_config, current_revisions, sql_script, upgrade
from segsvc.models import ModelVersion
from segsvc.schema import code_revisions
from segsvc.settings import Settings, get_settings
from tests.conftest import postgres_database
from tests.migrations.test_0006_model_file_deleted_at import PRUNED_AT, pruned_version

pytestmark = pytest.mark.skipif(
    not (shutil.which("psql") and shutil.which("pg_dump")),
    reason="needs the PostgreSQL client tools (psql, pg_dump)",
)

HEADS = tuple(sorted(code_revisions()[1]))


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The CLI's `get_settings()` read afresh from the environment: a Postgres no one can
    reach (a script needs no connection)."""
    monkeypatch.setenv("SEG_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/never")
    monkeypatch.setenv("SEG_VAR_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def two_dbs() -> Iterator[tuple[Settings, Settings]]:
    """Two empty Postgres databases: one migrated live, one by the script."""
    with (
        postgres_database(f"segsvc_sql_live_{os.getpid()}") as live,
        postgres_database(f"segsvc_sql_script_{os.getpid()}") as scripted,
    ):
        yield (
            Settings(database_url=live, _env_file=None),  # type: ignore[call-arg]
            Settings(database_url=scripted, _env_file=None),  # type: ignore[call-arg]
        )


def libpq_url(settings: Settings) -> str:
    return settings.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://")


def psql(settings: Settings, script: str, tmp_path: Path) -> None:
    """Apply `script` as a DBA would: psql, stopping at the first error; as a role whose
    statements are cut off after 1 ms (an `ALTER ROLE ... SET statement_timeout`, a pooler's
    limit), which the script lifts for itself as the live upgrade does."""
    path = tmp_path / f"{uuid.uuid4().hex}.sql"
    path.write_text(script)
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path), libpq_url(settings)],
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "PGOPTIONS": "-c statement_timeout=1"},
    )


def schema(settings: Settings) -> str:
    """The database's schema as pg_dump prints it, its comments and random keys left out."""
    dump = subprocess.run(
        ["pg_dump", "--schema-only", "--no-owner", libpq_url(settings)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    kept = [
        line
        for line in dump.splitlines()
        if not line.startswith("--") and not re.match(r"\\(un)?restrict ", line)
    ]
    return "\n".join(kept)


def script(settings: Settings, **kwargs: str) -> str:
    out = io.StringIO()
    sql_script(out=out, settings=settings, **kwargs)
    return out.getvalue()


def test_sql_script_builds_the_schema_the_live_upgrade_builds(
    two_dbs: tuple[Settings, Settings], tmp_path: Path
) -> None:
    """Offline mode failed at 0003: steps read the database (invalid indexes, the server's
    version, columns present, rows to move) through a connection a script does not have."""
    live, scripted = two_dbs
    upgrade(settings=live)
    sql = script(scripted)
    assert sql.startswith("-- segsvc schema migration script")
    assert "CREATE INDEX CONCURRENTLY" in sql
    psql(scripted, sql, tmp_path)
    assert schema(scripted) == schema(live)
    assert current_revisions(scripted) == HEADS
    with get_engine(scripted).connect() as conn:  # 0005's statistics, on a server that has them
        assert conn.scalar(text("SELECT count(*) FROM pg_statistic_ext")) == 1


def test_sql_script_from_a_revision_moves_the_data_the_live_steps_move(
    two_dbs: tuple[Settings, Settings], tmp_path: Path
) -> None:
    """From 0005: 0006 moves a kept deletion time out of `metrics` into its column, 0007 clears
    the model input of ended jobs; a downgrade script (alembic's own `--sql`) keeps the time."""
    _, db = two_dbs
    upgrade(settings=db)
    with session_scope(db) as session:
        session.add(pruned_version())
    down = io.StringIO()
    cfg = alembic_config(db)
    cfg.output_buffer = down
    command.downgrade(cfg, f"{HEADS[0]}:0005", sql=True)
    psql(db, down.getvalue(), tmp_path)
    assert current_revisions(db) == ("0005",)
    with get_engine(db).begin() as conn:
        kept = conn.scalar(text("SELECT metrics FROM model_versions"))
        assert kept["mean_iou"] == 0.7
        assert datetime.fromisoformat(kept["_file_deleted_at"]) == PRUNED_AT
        conn.execute(
            text(
                "INSERT INTO jobs (id, status, created_at, attempts, releases, cancel_requested,"
                " input_sha256, input_content_type, input_width, input_height, model_input)"
                " VALUES (:a, 'succeeded', now(), 1, 0, false, 'a', 'image/png', 1, 1, '\\x01'),"
                " (:b, 'queued', now(), 0, 0, false, 'b', 'image/png', 1, 1, '\\x02')"
            ),
            {"a": uuid.uuid4(), "b": uuid.uuid4()},
        )

    psql(db, script(db, from_revision="0005"), tmp_path)

    assert current_revisions(db) == HEADS
    with session_scope(db) as session:
        version = session.scalars(select(ModelVersion)).one()
        assert version.file_deleted_at == PRUNED_AT
        assert version.metrics == {"mean_iou": 0.7}  # moved, not copied
    with get_engine(db).connect() as conn:
        inputs = dict(conn.execute(text("SELECT status, model_input FROM jobs")).all())
    assert inputs == {"succeeded": None, "queued": b"\x02"}


def test_db_upgrade_sql_prints_the_script_and_connects_to_nothing(cli_env: None) -> None:
    """A database no one can reach: the script needs none."""
    result = CliRunner().invoke(main, ["db", "upgrade", "--sql", "--from", "0012"])
    assert result.exit_code == 0, result.output
    assert "Running upgrade 0012 -> 0013" in result.output
    assert "ALTER TABLE webhook_messages ADD COLUMN scheduled_at" in result.output
    assert "CREATE TABLE jobs" not in result.output


@pytest.mark.parametrize(
    ("args", "sqlite", "message"),
    [
        (["--sql"], True, "a SQL script is written for Postgres"),
        (["--from", "0012"], False, "--from goes with --sql"),
        (["--sql", "--init-models"], False, "--init-models writes to the database"),
        (["--sql", "--from", "0099"], False, "no script: Can't locate revision"),
        # Alembic wrote an empty script, exit 0: the live upgrade says it never goes back.
        (["--sql", "--from", "0013", "--revision", "0012"], False, "0012 is older than 0013"),
    ],
)
def test_db_upgrade_sql_refuses_what_it_cannot_write(
    args: list[str], sqlite: bool, message: str, cli_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sqlite:  # the default database: SQLite under SEG_VAR_DIR
        monkeypatch.delenv("SEG_DATABASE_URL")
        get_settings.cache_clear()
    result = CliRunner().invoke(main, ["db", "upgrade", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
