"""Webhook messages are recorded, redelivered and their jobs canceled on Postgres' clock: a host
whose clock is hours off neither holds a first attempt back nor sends it early, and a job's
events keep their order whichever hosts recorded them (segsvc/webhooks/outbox.py,
segsvc/services/webhooks.py `redeliver`, segsvc/services/jobs.py `cancel_job`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select

from segsvc.db import session_scope
from segsvc.models import WebhookMessage
from segsvc.services import jobs as job_service
from segsvc.services import webhooks as webhook_service
from segsvc.settings import Settings
from tests.conftest import db_clock
from tests.segsvc.webhooks.factories import finish_job, make_job, start_job
from tests.segsvc.webhooks.test_dispatch_clock import URL

pytestmark = pytest.mark.timeout(60)

SKEW = timedelta(hours=3)
CLOSE = timedelta(minutes=1)


def messages(settings: Settings) -> list[WebhookMessage]:
    with session_scope(settings) as session:
        return list(session.scalars(select(WebhookMessage).order_by(WebhookMessage.created_at)))


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_a_job_s_messages_are_stamped_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None], offset: timedelta
) -> None:
    job_id = make_job(settings, URL, events=["start", "completed"])
    claimed = start_job(settings, job_id)  # job.started recorded by a host whose clock is true
    skew_clock(offset)  # ... and job.completed by one whose clock is hours off
    finish_job(settings, claimed)
    now = db_clock(settings)
    started, completed = messages(settings)
    assert [started.event_type, completed.event_type] == ["job.started", "job.completed"]
    for message in (started, completed):
        assert abs(message.created_at - now) < CLOSE
        assert message.next_attempt_at is not None
        assert abs(message.next_attempt_at - now) < CLOSE


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_a_redelivery_and_a_cancel_are_stamped_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None], offset: timedelta
) -> None:
    canceled = make_job(settings, URL)
    skew_clock(offset)
    with session_scope(settings) as session:
        job = job_service.cancel_job(session=session, job_id=str(canceled), client_id=None)
        assert job.completed_at is not None
        assert abs(job.completed_at - db_clock(settings)) < CLOSE
    (message,) = messages(settings)
    assert abs(message.created_at - db_clock(settings)) < CLOSE
    with session_scope(settings) as session:
        again = webhook_service.redeliver(
            session=session, job_id=str(canceled), message_id=message.id, client_id=None
        )
        assert again.next_attempt_at is not None
        assert abs(again.next_attempt_at - db_clock(settings)) < CLOSE


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_a_rotated_secret_signs_for_its_window_whatever_the_hosts_clocks(
    settings: Settings, skew_clock: Callable[[timedelta], None], offset: timedelta
) -> None:
    # The API host that rotates and the workers that sign judge the window on one clock: the old
    # secret signs beside the new one for the window, not hours more or not at all.
    with session_scope(settings) as session:
        (old,) = webhook_service.signing_secrets(session=session, client_id=None)
        old_key = old.secret
    skew_clock(offset)  # the rotating host's clock is hours off
    with session_scope(settings) as session:
        new = webhook_service.rotate_secret(session=session, client_id=None, settings=settings)
        new_key = new.secret
        assert abs(new.created_at - db_clock(settings)) < CLOSE
    skew_clock(-offset)  # and a signing host's the other way
    with session_scope(settings) as session:
        keys = [r.secret for r in webhook_service.signing_secrets(session=session, client_id=None)]
        assert keys == [new_key, old_key]
        (row,) = [
            r
            for r in webhook_service.signing_secrets(session=session, client_id=None)
            if r.secret == old_key
        ]
        window = timedelta(seconds=settings.webhook_secret_rotation_seconds)
        assert row.expires_at is not None
        assert abs(row.expires_at - (db_clock(settings) + window)) < CLOSE
