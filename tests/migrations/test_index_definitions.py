"""The models' indexes and the migrated ones are defined alike, partial conditions included:
alembic's compare_metadata ignores `postgresql_where`, so a condition could drift silently."""

from __future__ import annotations

import re

from sqlalchemy import text

from segsvc.db import get_engine
from segsvc.models import Base
from segsvc.settings import Settings


def _index_definitions(settings: Settings) -> dict[str, str]:
    """Each public index's definition as Postgres prints it, less its own name."""
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'"
            )
        ).all()
    return {name: re.sub(r" INDEX \S+ ON ", " INDEX ON ", definition) for name, definition in rows}


def test_models_and_migrations_define_every_index_alike(
    settings: Settings, pg_db: Settings
) -> None:
    with get_engine(pg_db).begin() as conn:
        Base.metadata.create_all(conn)
    from_models, migrated = _index_definitions(pg_db), _index_definitions(settings)
    assert sorted(from_models) == sorted(migrated)
    differ = {
        name: (from_models[name], migrated[name])
        for name in from_models
        if from_models[name] != migrated[name]
    }
    assert differ == {}
