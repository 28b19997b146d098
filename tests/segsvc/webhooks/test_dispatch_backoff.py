"""A message's own backoff and its endpoint's pauses (segsvc/webhooks/dispatch.py): a pause
only ever puts a message off, and the delivery that ends a run of failures lets go what the
pauses put off, each no earlier than its own retry time. A message that kept failing on its own
was tried again after every delivery to its endpoint (`scheduled_at`, migration 0013)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from segsvc.db import session_scope
from segsvc.models import WebhookEndpoint, WebhookMessage
from segsvc.services import webhooks as webhook_service
from segsvc.settings import Settings
from segsvc.webhooks import dispatch
from segsvc.webhooks.delivery import Outcome
from segsvc.webhooks.outbox import JOB_COMPLETED, job_message_id
from tests.conftest import db_clock
from tests.segsvc.webhooks.factories import finish_job, make_job, start_job

pytestmark = pytest.mark.timeout(60)

URL = "https://hooks.example/segsvc"
REJECTED = Outcome("retry", 5.0, 400, "HTTP 400")
DELIVERED = Outcome("delivered", 5.0, 204)


@pytest.fixture
def cfg(settings: Settings) -> Settings:
    """A 5 min retry after the first failure; endpoint pauses of at most 1 s."""
    return settings.model_copy(
        update={"webhook_schedule": "0,300", "webhook_endpoint_pause_max_seconds": 1.0}
    )


def completed(cfg: Settings) -> tuple[uuid.UUID, str]:
    """A job and its job.completed message, due now."""
    job_id = make_job(cfg, URL)
    finish_job(cfg, start_job(cfg, job_id))
    return job_id, job_message_id(job_id, JOB_COMPLETED)


def claim_and_start(cfg: Settings, *wanted: str, limit: int = 100) -> list[dispatch.Prepared]:
    """Claim what is due (the `limit` due first) and start the attempts of `wanted`."""
    with session_scope(cfg) as session:
        leases = dict(dispatch.claim_due(session=session, limit=limit))
    assert set(wanted) <= set(leases), (wanted, leases)
    started = []
    for message_id in wanted:
        with session_scope(cfg) as session:
            prepared = dispatch.start_attempt(
                session=session, message_id=message_id, lease=leases[message_id], settings=cfg
            )
        assert prepared is not None
        started.append(prepared)
    return started


def record(cfg: Settings, prepared: dispatch.Prepared, outcome: Outcome) -> None:
    """What the webhook worker does after the POST: two transactions."""
    with session_scope(cfg) as session:
        dispatch.finish_attempt(session=session, prepared=prepared, outcome=outcome, settings=cfg)
    with session_scope(cfg) as session:
        dispatch.record_endpoint_outcome(
            session=session, prepared=prepared, outcome=outcome, settings=cfg
        )


def pause_ends(cfg: Settings) -> None:
    """The endpoint's pause is over (no message's own retry time has come)."""
    with session_scope(cfg) as session:
        session.execute(update(WebhookEndpoint).values(paused_until=db_clock(cfg)))


def due_in(cfg: Settings, message_id: str) -> float:
    """Seconds until the message is next due (negative: due), on the database's clock."""
    with session_scope(cfg) as session:
        due = session.scalar(
            select(WebhookMessage.next_attempt_at).where(WebhookMessage.id == message_id)
        )
    assert isinstance(due, datetime)
    return (due - db_clock(cfg)).total_seconds()


def paused_for(cfg: Settings) -> float:
    with session_scope(cfg) as session:
        until = session.scalar(select(WebhookEndpoint.paused_until))
    assert isinstance(until, datetime)
    return (until - db_clock(cfg)).total_seconds()


def test_a_delivery_leaves_a_message_that_fails_on_its_own_to_its_backoff(cfg: Settings) -> None:
    # Regression: after a 2xx every message more than a lease ahead was made due, so one that a
    # receiver kept refusing (400 to job.started, 204 to job.completed) was retried after every
    # delivery to its endpoint, not 5 min later, each time pausing the endpoint.
    _, refused = completed(cfg)
    (first,) = claim_and_start(cfg, refused)
    record(cfg, first, REJECTED)  # its own retry in 5 min; the endpoint paused 1 s
    assert 250 < due_in(cfg, refused) < 350
    pause_ends(cfg)
    _, accepted = completed(cfg)
    (probe,) = claim_and_start(cfg, accepted)  # the endpoint's probe
    record(cfg, probe, DELIVERED)  # the run of failures is over
    assert 250 < due_in(cfg, refused) < 350  # still its own 5 min
    with session_scope(cfg) as session:
        message = session.get(WebhookMessage, refused)
        assert message is not None
        assert (message.attempts, message.status) == (1, "pending")
        assert message.scheduled_at == message.next_attempt_at


def test_a_delivery_lets_go_what_a_long_retry_after_put_off_no_earlier_than_its_own_time(
    cfg: Settings,
) -> None:
    _, refused = completed(cfg)
    job_id, asked_to_wait = completed(cfg)
    first, second = claim_and_start(cfg, refused, asked_to_wait)  # in flight together
    record(cfg, first, REJECTED)  # its own retry in 5 min
    record(cfg, second, Outcome("retry", 5.0, 503, "HTTP 503", retry_after="3600"))
    assert 3500 < paused_for(cfg) < 3700  # the endpoint waits the hour it was asked to
    assert 3500 < due_in(cfg, refused) < 3700  # put off to the pause's end
    _, recorded_in_pause = completed(cfg)
    assert 3500 < due_in(cfg, recorded_in_pause) < 3700

    # The client redelivers the message that was asked to wait: the pause ends, it is the probe
    with session_scope(cfg) as session:
        webhook_service.redeliver(
            session=session, job_id=str(job_id), message_id=asked_to_wait, client_id=None
        )
    (probe,) = claim_and_start(cfg, asked_to_wait)
    record(cfg, probe, DELIVERED)
    assert due_in(cfg, recorded_in_pause) <= 0  # never attempted: due now
    assert 250 < due_in(cfg, refused) < 350  # let go, at its own time: not now, not in an hour


def test_a_redelivered_message_is_put_off_to_the_pause_not_to_its_old_retry_time(
    cfg: Settings,
) -> None:
    """A redelivery asks for the message now: its last attempt's retry time (`scheduled_at`,
    which the redelivery leaves) no longer holds it back."""
    job_id, redelivered = completed(cfg)
    (first,) = claim_and_start(cfg, redelivered)
    record(cfg, first, REJECTED)  # its own retry in 5 min
    with session_scope(cfg) as session:
        webhook_service.redeliver(
            session=session, job_id=str(job_id), message_id=redelivered, client_id=None
        )
    _, other = completed(cfg)
    with session_scope(cfg) as session:  # due before the redelivered one: claimed first
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id == other)
            .values(next_attempt_at=db_clock(cfg) - timedelta(seconds=1))
        )
    (probe,) = claim_and_start(cfg, other, limit=1)  # the probe holds the redelivered one
    assert 0 < due_in(cfg, redelivered) <= dispatch.attempt_lease(cfg).total_seconds()
    record(cfg, probe, REJECTED)  # the endpoint pauses again, for 1 s
    assert 0 < due_in(cfg, redelivered) <= 1.5  # the pause's end, not its old 5 min
