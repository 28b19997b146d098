"""Migration 0013: webhook_messages.scheduled_at, a message's own retry time. A downgrade drops
only the column (the messages and their due times stay), and the re-upgrade adds it back
empty: NULL, which the dispatcher reads as "no retry time of its own" (let go as before 0013)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import command
from sqlalchemy import inspect, select

from segsvc.db import get_engine, session_scope
from segsvc.migrate import alembic_config, upgrade
from segsvc.models import Job, WebhookMessage
from segsvc.settings import Settings

DUE = datetime(2026, 12, 3, 10, 0, 0, 250000, tzinfo=UTC)


def _columns(cfg: Settings) -> set[str]:
    return {column["name"] for column in inspect(get_engine(cfg)).get_columns("webhook_messages")}


def test_0013_a_downgrade_drops_only_the_retry_times(empty_db: Settings) -> None:
    upgrade(settings=empty_db)
    assert "scheduled_at" in _columns(empty_db)
    with session_scope(empty_db) as session:
        job = Job(
            status="succeeded",
            input_sha256="0" * 64,
            input_content_type="image/png",
            input_width=1,
            input_height=1,
        )
        session.add(job)
        session.flush()
        session.add(
            WebhookMessage(
                id="msg_1",
                job_id=job.id,
                event_type="job.completed",
                url="https://hooks.example/a",
                payload={},
                status="pending",
                attempts=2,
                created_at=DUE - timedelta(hours=1),
                next_attempt_at=DUE + timedelta(days=1),  # put off by a pause
                scheduled_at=DUE,  # its own backoff
            )
        )
    command.downgrade(alembic_config(empty_db), "0012")
    assert "scheduled_at" not in _columns(empty_db)
    upgrade(settings=empty_db)
    with session_scope(empty_db) as session:
        message = session.scalars(select(WebhookMessage)).one()
        assert message.scheduled_at is None
        assert (message.id, message.attempts, message.status) == ("msg_1", 2, "pending")
        assert message.next_attempt_at == DUE + timedelta(days=1)
