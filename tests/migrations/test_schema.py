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
