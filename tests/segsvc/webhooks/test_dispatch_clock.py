"""Webhook delivery leases and retry times are granted and judged on Postgres' clock: a worker
whose clock is hours off neither takes over a live attempt nor leaves a due message waiting
(segsvc/webhooks/dispatch.py; the jobs' leases: tests/segsvc/services/test_lease_clock.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from segsvc.db import session_scope
from segsvc.models import WebhookMessage
from segsvc.settings import Settings
from segsvc.webhooks import dispatch
from segsvc.webhooks.delivery import Outcome
from segsvc.webhooks.dispatch import attempt_lease, claim_due, finish_attempt, start_attempt
from tests.conftest import db_clock
from tests.segsvc.webhooks.factories import finish_job, make_job, start_job

pytestmark = pytest.mark.timeout(60)

URL = "https://hooks.example/segsvc"
SKEW = timedelta(hours=3)  # far more than any lease


def pending_message(settings: Settings, *, due_in_s: float) -> str:
    """A job.completed message (recorded on a true clock) next tried `due_in_s` from now on
    Postgres' clock: due when negative, leased to a dispatcher when positive."""
    finish_job(settings, start_job(settings, make_job(settings, URL)))
    with session_scope(settings) as session:
        message_id = session.scalars(select(WebhookMessage.id)).one()
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id == message_id)
            .values(next_attempt_at=text("statement_timestamp() + make_interval(secs => :s)")),
            {"s": due_in_s},
        )
    return message_id


def next_attempt_at(settings: Settings, message_id: str) -> datetime | None:
    with session_scope(settings) as session:
        message = session.get(WebhookMessage, message_id)
        assert message is not None
        return message.next_attempt_at


def claim(settings: Settings) -> list[tuple[str, datetime]]:
    with session_scope(settings) as session:
        return claim_due(session=session)


def test_claim_due_with_a_fast_clock_leaves_a_leased_message(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    pending_message(settings, due_in_s=30)  # another dispatcher's hint is on its way
    skew_clock(SKEW)  # this host believes its lease ran out hours ago
    assert claim(settings) == []


def test_claim_due_with_a_slow_clock_leases_a_due_message_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    message_id = pending_message(settings, due_in_s=-1)
    skew_clock(-SKEW)  # this host believes it is due in hours
    before = db_clock(settings)
    ((claimed, lease),) = claim(settings)
    after = db_clock(settings)
    lease_s = timedelta(seconds=dispatch.DISPATCH_LEASE_S)
    assert claimed == message_id
    assert before + lease_s <= lease <= after + lease_s
    assert next_attempt_at(settings, message_id) == lease


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_start_attempt_leases_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None], offset: timedelta
) -> None:
    pending_message(settings, due_in_s=-1)
    ((message_id, lease),) = claim(settings)
    skew_clock(offset)
    before = db_clock(settings)
    with session_scope(settings) as session:
        prepared = start_attempt(
            session=session, message_id=message_id, lease=lease, settings=settings
        )
    after = db_clock(settings)
    assert prepared is not None
    grant = attempt_lease(settings)
    assert before + grant <= prepared.lease <= after + grant
    assert next_attempt_at(settings, message_id) == prepared.lease


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_finish_attempt_schedules_the_retry_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None], offset: timedelta
) -> None:
    cfg = settings.model_copy(update={"webhook_schedule": "0,100"})
    pending_message(cfg, due_in_s=-1)
    ((message_id, lease),) = claim(cfg)
    skew_clock(offset)
    with session_scope(cfg) as session:
        prepared = start_attempt(session=session, message_id=message_id, lease=lease, settings=cfg)
    assert prepared is not None
    before = db_clock(cfg)
    with session_scope(cfg) as session:
        status = finish_attempt(
            session=session,
            prepared=prepared,
            outcome=Outcome("retry", 1.0, 503, "HTTP 503"),
            settings=cfg,
        )
    after = db_clock(cfg)
    assert status == "pending"
    retry = next_attempt_at(cfg, message_id)
    assert retry is not None  # 100 s later (jitter: +-10 %), not 3 h early or late
    assert before + timedelta(seconds=90) <= retry <= after + timedelta(seconds=110)
