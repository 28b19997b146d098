"""Messages past their max age that were never attempted end in bulk
(`dispatch.expire_unattempted`, run by each webhook dispatcher every few minutes): a receiver
that is down gets no attempt but its probes, so its backlog ended only a handful per claim (as
`start_attempt` reached each), and a busy client's outgrew its max age."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from segsvc.db import session_scope
from segsvc.models import WebhookMessage
from segsvc.settings import Settings
from segsvc.webhooks import dispatch
from segsvc.webhooks.delivery import Outcome
from segsvc.webhooks.outbox import JOB_COMPLETED, job_message_id
from tests.segsvc.webhooks.factories import finish_job, make_job, start_job
from worker.webhook_tasks import expire_over_age

pytestmark = pytest.mark.timeout(60)

URL = "https://hooks.example/segsvc"


def completed(settings: Settings, *, age_days: float, **values: object) -> str:
    """A job's job.completed message made `age_days` ago, still pending (plus `values`)."""
    job_id = make_job(settings, URL)
    finish_job(settings, start_job(settings, job_id))
    message_id = job_message_id(job_id, JOB_COMPLETED)
    made = datetime.now(UTC) - timedelta(days=age_days)
    with session_scope(settings) as session:
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id == message_id)
            .values(created_at=made, **values)
        )
    return message_id


def statuses(settings: Settings) -> dict[str, str]:
    with session_scope(settings) as session:
        rows = session.execute(select(WebhookMessage.id, WebhookMessage.status)).all()
    return {str(message_id): str(status) for message_id, status in rows}


def failed_count() -> float:
    value = REGISTRY.get_sample_value("segsvc_webhook_messages_ended_total", {"status": "failed"})
    return value or 0.0


def test_over_age_messages_never_attempted_end_failed_in_bulk(settings: Settings) -> None:
    max_age_days = settings.webhook_max_age_seconds / 86400
    old = [completed(settings, age_days=max_age_days + 1) for _ in range(3)]
    young = completed(settings, age_days=max_age_days - 0.5)
    attempted = completed(settings, age_days=max_age_days + 1, attempts=1)  # its own rule
    redelivered = completed(
        settings, age_days=max_age_days + 1, redelivered_at=datetime.now(UTC)
    )  # a client asked for it now: attempted whatever its age
    before = failed_count()

    assert expire_over_age(settings) == 3

    found = statuses(settings)
    assert {found[m] for m in old} == {"failed"}
    assert (found[young], found[attempted], found[redelivered]) == ("pending",) * 3
    assert failed_count() - before == 3
    with session_scope(settings) as session:
        ended = session.scalars(select(WebhookMessage).where(WebhookMessage.id == old[0])).one()
        assert ended.next_attempt_at is None
        assert ended.completed_at is not None
    assert expire_over_age(settings) == 0


def test_expiry_runs_chunk_by_chunk_and_skips_a_row_another_transaction_holds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "EXPIRE_CHUNK", 2)
    age = settings.webhook_max_age_seconds / 86400 + 1
    messages = [completed(settings, age_days=age) for _ in range(5)]
    with session_scope(settings) as holder:  # another transaction holds one
        holder.scalars(
            select(WebhookMessage).where(WebhookMessage.id == messages[0]).with_for_update()
        ).one()
        with session_scope(settings) as session:
            assert dispatch.expire_unattempted(session=session, settings=settings, limit=2) == 2
        with session_scope(settings) as session:
            assert dispatch.expire_unattempted(session=session, settings=settings, limit=10) == 2
    found = statuses(settings)
    assert found[messages[0]] == "pending"
    assert sorted(found[m] for m in messages[1:]) == ["failed"] * 4
    assert expire_over_age(settings) == 1  # free now


def test_a_dispatcher_expires_on_its_first_poll(settings: Settings) -> None:
    """The dispatcher thread runs the expiry at once, then every EXPIRE_EVERY_S."""
    from celery import Celery

    from worker.webhook_tasks import Dispatcher

    message = completed(settings, age_days=settings.webhook_max_age_seconds / 86400 + 1)
    sender = Celery("test-expiry", broker="memory://")
    dispatcher = Dispatcher(settings, sender)
    dispatcher.start()
    try:
        for _ in range(100):
            if statuses(settings)[message] == "failed":
                break
            dispatcher.stopping.wait(0.05)
    finally:
        dispatcher.stopping.set()
        dispatcher.join(timeout=10)
    assert statuses(settings)[message] == "failed"


def test_a_first_attempt_under_way_is_left_to_its_outcome(settings: Settings) -> None:
    """The attempt's POST holds no row lock: a message that passed its max age while its first
    attempt was under way was failed by the expiry, and the receiver's 204 then found it
    ended (superseded): a delivered notice stayed failed, and a redeliver sent it twice."""
    max_age_days = settings.webhook_max_age_seconds / 86400
    message = completed(settings, age_days=max_age_days - 1 / 86400)  # a second to go
    with session_scope(settings) as session:
        leases = dict(dispatch.claim_due(session=session))
    with session_scope(settings) as session:
        prepared = dispatch.start_attempt(
            session=session, message_id=message, lease=leases[message], settings=settings
        )
    assert isinstance(prepared, dispatch.Prepared)
    with session_scope(settings) as session:  # the max age passes during the POST
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id == message)
            .values(created_at=datetime.now(UTC) - timedelta(days=max_age_days, seconds=5))
        )
    assert expire_over_age(settings) == 0
    with session_scope(settings) as session:
        status = dispatch.finish_attempt(
            session=session,
            prepared=prepared,
            outcome=Outcome("delivered", 5.0, 204),
            settings=settings,
        )
    assert status == "delivered"
    assert statuses(settings)[message] == "delivered"
