"""The ORM models and the Alembic migrations describe the same schema."""

from __future__ import annotations

import uuid

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text

from segsvc.db import get_engine, session_scope
from segsvc.models import Base, Job, WebhookEndpoint
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


def test_0003_resolves_duplicates_the_missing_indexes_let_in(empty_db: Settings) -> None:
    # Regression: with auth off, twin submits with one Idempotency-Key both inserted (NULL
    # client ids are distinct to a unique index); the unique index 0003 adds then failed to
    # build on such a database, and the release stopped at its migration.
    from segsvc.migrate import upgrade

    upgrade(settings=empty_db, revision="0002")
    jobs = [(uuid.uuid4(), f"2026-11-2{i} 10:00:00+00") for i in (1, 2, 3)]
    endpoints = [uuid.uuid4() for _ in range(3)]
    with get_engine(empty_db).begin() as conn:
        for job_id, created in jobs:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, status, created_at, attempts, cancel_requested, "
                    "idempotency_key, input_sha256, input_content_type, input_width, "
                    "input_height) VALUES (:id, 'succeeded', :created, 1, false, 'order-1', "
                    "'0', 'image/png', 1, 1)"
                ),
                {"id": job_id.hex if empty_db.database_url is None else job_id, "created": created},
            )
        for i, endpoint_id in enumerate(endpoints):
            conn.execute(
                text(
                    "INSERT INTO webhook_endpoints (id, url, created_at, disabled_at, "
                    "disabled_reason) VALUES (:id, 'https://hooks.example/a', "
                    "'2026-11-20 10:00:00+00', :at, :why)"
                ),
                {
                    "id": endpoint_id.hex if empty_db.database_url is None else endpoint_id,
                    "at": "2026-11-25 10:00:00+00" if i == 2 else None,
                    "why": "the endpoint answered 410 Gone" if i == 2 else None,
                },
            )
    upgrade(settings=empty_db)
    with session_scope(empty_db) as session:
        keyed = (
            session.execute(select(Job.id).where(Job.idempotency_key == "order-1")).scalars().all()
        )
        assert keyed == [jobs[0][0]]  # the oldest keeps its key: retries replay it
        (endpoint,) = session.scalars(select(WebhookEndpoint)).all()
        assert endpoint.disabled_at is not None  # the 410 seen by a twin still holds
    from alembic import command

    from segsvc.migrate import alembic_config

    command.downgrade(alembic_config(empty_db), "0002")
    upgrade(settings=empty_db)
