"""The ORM models and the Alembic migrations describe the same schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from segsvc.db import get_engine
from segsvc.models import Base
from segsvc.settings import Settings


def test_models_match_migrations(settings: Settings) -> None:
    with get_engine(settings).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_migrations_run_on_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from segsvc.migrate import upgrade

    cfg = Settings(var_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    upgrade(settings=cfg)
    with get_engine(cfg).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_image_columns_skip_compression(settings: Settings) -> None:
    """Encoded images and model inputs are stored out of line without a pglz attempt."""
    from sqlalchemy import text

    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname, a.attname, a.attstorage FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE c.relname IN ('jobs', 'feedback') AND a.atttypid = 'bytea'::regtype"
            )
        ).all()
    storage = {(table, column): kind for table, column, kind in rows}
    assert storage == {
        ("jobs", "input_bytes"): "e",
        ("jobs", "model_input"): "e",
        ("jobs", "mask_png"): "e",
        ("feedback", "mask_png"): "e",
    }
