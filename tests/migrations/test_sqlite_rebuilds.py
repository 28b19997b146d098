"""SQLite rebuilds a table for most batch steps (copy, DROP, rename): the rows that refer to it
must come through."""

from __future__ import annotations

import uuid
from pathlib import Path

from alembic import command
from sqlalchemy import text

from segsvc.db import get_engine
from segsvc.migrate import alembic_config, upgrade
from segsvc.settings import Settings


def test_a_rebuild_of_jobs_keeps_the_feedback_and_webhooks_of_its_jobs(tmp_path: Path) -> None:
    cfg = Settings(var_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    upgrade(settings=cfg)
    job = uuid.uuid4().hex
    with get_engine(cfg).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, status, created_at, attempts, releases, cancel_requested, "
                "input_sha256, input_content_type, input_width, input_height) "
                "VALUES (:id, 'succeeded', '2026-11-27 08:00:00', 1, 0, 0, '0', 'image/png', 1, 1)"
            ),
            {"id": job},
        )
        conn.execute(
            text(
                "INSERT INTO feedback (id, job_id, rating, created_at) "
                "VALUES (:id, :job, 'good', '2026-11-27 08:01:00')"
            ),
            {"id": uuid.uuid4().hex, "job": job},
        )
        conn.execute(
            text(
                "INSERT INTO webhook_messages (id, job_id, event_type, url, payload, status, "
                "attempts, created_at) VALUES ('msg_1', :job, 'job.completed', "
                "'http://127.0.0.1:9/hook', '{}', 'delivered', 1, '2026-11-27 08:01:00')"
            ),
            {"job": job},
        )
    # 0004's downgrade drops two columns of jobs: SQLite rebuilds the table.
    command.downgrade(alembic_config(cfg), "0003")
    upgrade(settings=cfg)
    with get_engine(cfg).connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM jobs")) == 1
        # Before: the DROP of the old jobs table cascaded to both.
        assert conn.scalar(text("SELECT count(*) FROM feedback")) == 1
        assert conn.scalar(text("SELECT count(*) FROM webhook_messages")) == 1
