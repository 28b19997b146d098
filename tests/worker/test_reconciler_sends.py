"""When the reconciler's re-sends go out, on real Postgres and Redis: a send that fails (or a
process that dies before it) never leaves a job queued without a message for good, whether the
broker can be inspected (Redis) or not; and a pass due while a quarantine step holds the lock
still runs."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import text, update

from segsvc.db import get_sessionmaker, session_scope
from segsvc.models import Job
from segsvc.queue import make_celery
from segsvc.services import reconcile as service
from segsvc.settings import Settings
from tests.segsvc.services.test_reconcile import lost_job
from tests.worker.test_reconciler import get, make_job, queued_ids
from worker import reconciler

pytestmark = pytest.mark.timeout(60)


class BrokerDown(ConnectionError):
    """A send that failed."""


def sends_failing_for(
    monkeypatch: pytest.MonkeyPatch, failing: set[uuid.UUID] | None = None
) -> list[uuid.UUID]:
    """Make the reconciler's send fail for `failing` (every job when None); the ids it sent."""
    real = reconciler._send
    sent: list[uuid.UUID] = []

    def send(
        celery_app: Celery, cfg: Settings, job_id: uuid.UUID, *, suspect: bool = False
    ) -> None:
        if failing is None or job_id in failing:
            raise BrokerDown("the broker is away")
        if cfg.celery_broker_url.startswith("redis://"):  # not the embedded default's SQLite
            real(celery_app, cfg, job_id, suspect=suspect)
        sent.append(job_id)

    monkeypatch.setattr(reconciler, "_send", send)
    return sent


def age_enqueued(settings: Settings, job_id: uuid.UUID, seconds: float) -> None:
    """Move the job's last send `seconds` into the past (past the grace period)."""
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(enqueued_at=text("enqueued_at - make_interval(secs => :s)")),
            {"s": seconds},
        )


def test_with_redis_a_failed_send_neither_stops_the_others_nor_loses_its_job(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: sends after the commit stopped at the first that failed, and a suspect left
    # queued without a message held the quarantine until another pass found it missing.
    suspect = lost_job(settings, attempts=2, age_s=61)
    first_loss = lost_job(settings, attempts=1, age_s=60)
    sent = sends_failing_for(monkeypatch, {suspect})
    counts = reconciler.run_reconcile(settings, make_celery(settings))
    assert (counts["requeued_lost"], counts["unsent"]) == (2, 1)
    assert (sent, queued_ids(settings)) == ([first_loss], [str(first_loss)])
    assert get(settings, suspect).status == "queued"
    monkeypatch.undo()  # the broker is back
    age_enqueued(settings, suspect, service.enqueue_grace_seconds(settings) + 1)
    counts = reconciler.run_reconcile(settings, make_celery(settings))
    assert counts["requeued_missing"] == 1  # found missing from the broker
    assert sorted(queued_ids(settings)) == sorted([str(first_loss), str(suspect)])


def test_with_redis_away_a_pass_stops_sending_after_a_few_failures(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each send to a black-holed broker can take 10 s: a pass re-queuing thousands must not
    spend hours on them. The next pass re-sends them all once the broker is back."""
    lost = [lost_job(settings, attempts=1, age_s=60 - i) for i in range(6)]
    tries: list[uuid.UUID] = []

    def send(celery_app: Celery, cfg: Settings, job_id: uuid.UUID, **_: object) -> None:
        tries.append(job_id)
        raise BrokerDown("the broker is away")

    monkeypatch.setattr(reconciler, "_send", send)
    counts = reconciler.run_reconcile(settings, make_celery(settings))
    assert (counts["requeued_lost"], counts["unsent"]) == (6, 6)
    assert tries == lost[: reconciler.MAX_FAILED_SENDS_IN_A_ROW]


@pytest.fixture
def no_redis(settings: Settings, tmp_path: Path) -> Settings:
    """The test database with a broker that cannot be inspected (the embedded default's)."""
    cfg = settings.model_copy(update={"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"})
    assert reconciler.broker_snapshot(cfg) is None
    return cfg


def test_without_redis_a_failed_send_rolls_its_pass_back(
    no_redis: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the pass committed the suspect `queued` and its send failed; with no broker to
    # inspect nothing ever re-sent it, and every other suspect waited for it for ever.
    suspect = lost_job(no_redis, attempts=2, age_s=61)
    waiting = lost_job(no_redis, attempts=2, age_s=60)
    sends_failing_for(monkeypatch)
    with pytest.raises(BrokerDown):
        reconciler.run_reconcile(no_redis, make_celery(no_redis))
    assert get(no_redis, suspect).status == "running"  # as it was: the next pass retries
    sent = sends_failing_for(monkeypatch, set())
    counts = reconciler.run_reconcile(no_redis, make_celery(no_redis))
    assert (counts["requeued_lost"], counts["waiting_suspects"]) == (1, 1)
    assert sent == [suspect]
    assert (get(no_redis, suspect).status, get(no_redis, waiting).status) == ("queued", "running")


def test_without_redis_the_message_goes_before_the_commit(
    no_redis: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row is updated (and locked) when the message goes, but not yet committed."""
    job_id = lost_job(no_redis, attempts=1)
    seen: list[str] = []

    def send(celery_app: Celery, cfg: Settings, sent: uuid.UUID, **_: object) -> None:
        seen.append(get(cfg, sent).status)  # another transaction's view

    monkeypatch.setattr(reconciler, "_send", send)
    reconciler.run_reconcile(no_redis, make_celery(no_redis))
    assert seen == ["running"]
    assert get(no_redis, job_id).status == "queued"


def test_a_pass_waits_for_a_quarantine_step_holding_the_lock(settings: Settings) -> None:
    # Regression: a worker took the interval's turn, then found the lock held by another
    # worker's 2 s suspect step and skipped: no pass ran that interval.
    lost = make_job(settings)
    step = get_sessionmaker(settings)()
    step.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": service.LOCK_KEY})
    ends = threading.Timer(0.3, step.rollback)
    ends.start()
    try:
        counts = reconciler.run_reconcile(settings, make_celery(settings))
    finally:
        ends.join()
        step.close()
    assert not counts["skipped"]
    assert counts["requeued_missing"] == 1
    assert queued_ids(settings) == [str(lost)]
