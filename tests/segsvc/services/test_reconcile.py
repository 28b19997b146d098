"""segsvc/services/reconcile.py on real Postgres: the quarantine's step between passes."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from segsvc.db import session_scope
from segsvc.models import Job, utcnow
from segsvc.services import reconcile as service
from segsvc.settings import Settings
from tests.worker.test_reconciler import get, make_job

pytestmark = pytest.mark.timeout(60)


def lost_job(settings: Settings, *, attempts: int, age_s: float = 60) -> uuid.UUID:
    """A running job whose worker died: its lease ran out a second ago."""
    return make_job(
        settings,
        age_s=age_s,
        status="running",
        attempts=attempts,
        lease_token=uuid.uuid4(),
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )


def step(settings: Settings) -> tuple[service.ReconcileReport, list[uuid.UUID]]:
    """One suspect step under the reconciler lock; what it reported and sent."""
    sent: list[uuid.UUID] = []
    with session_scope(settings) as session:
        assert service.try_lock(session=session)
        report = service.send_next_suspect(session=session, settings=settings, enqueue=sent.append)
    return report, sent


def finish(settings: Settings, job_id: uuid.UUID, status: str = "succeeded") -> None:
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=status, lease_token=None, lease_expires_at=None)
        )


def test_send_next_suspect_sends_one_after_another(settings: Settings) -> None:
    suspects = [lost_job(settings, attempts=2, age_s=60 - i) for i in range(3)]
    report, sent = step(settings)
    assert (sent, report.waiting_suspects) == ([suspects[0]], 2)
    assert get(settings, suspects[0]).status == "queued"
    report, sent = step(settings)  # the first is still in flight
    assert (sent, report.waiting_suspects) == ([], 2)
    finish(settings, suspects[0])
    report, sent = step(settings)  # it ended: the next goes at once, not at the next pass
    assert (sent, report.waiting_suspects) == ([suspects[1]], 1)
    finish(settings, suspects[1], status="failed")
    report, sent = step(settings)
    assert (sent, report.waiting_suspects) == ([suspects[2]], 0)


def test_a_job_on_its_second_run_does_not_hold_the_quarantine(settings: Settings) -> None:
    """A job lost once and claimed again among others (no suspect: its claim says so) counted
    as a suspect in flight, its current run as a lost one: every waiting suspect waited for it,
    for a whole lease if its worker died too. A suspect claimed and running does hold it."""
    from segsvc.services import jobs as job_service

    waiting = lost_job(settings, attempts=2)
    second_run, mate = make_job(settings, attempts=1), make_job(settings)
    with session_scope(settings) as session:
        claimed = job_service.claim_jobs(
            session=session, job_ids=[second_run, mate], lease_seconds=120
        )
    assert sorted(c.id for c in claimed) == sorted([second_run, mate])
    assert not any(c.suspect for c in claimed)
    report, sent = step(settings)
    assert (sent, report.waiting_suspects) == ([waiting], 0), report.as_dict()
    with session_scope(settings) as session:  # the suspect sent is claimed: running, alone
        (suspect,) = job_service.claim_jobs(session=session, job_ids=[waiting], lease_seconds=120)
    assert suspect.suspect
    other = lost_job(settings, attempts=2)
    report, sent = step(settings)
    assert (sent, report.waiting_suspects) == ([], 1)  # one suspect in flight at a time
    finish(settings, waiting)
    report, sent = step(settings)
    assert sent == [other]


def test_send_next_suspect_ends_a_suspect_lost_again_and_sends_the_next(settings: Settings) -> None:
    # The suspect in flight crashed its worker once more, on its last attempt: poison.
    poison = lost_job(settings, attempts=settings.job_max_attempts, age_s=90)
    waiting = lost_job(settings, attempts=2)
    report, sent = step(settings)
    assert (report.failed, sent, report.waiting_suspects) == (1, [waiting], 0)
    job = get(settings, poison)
    assert (job.status, job.error_code) == ("failed", "poison_input")


def test_send_next_suspect_leaves_other_lost_jobs_to_the_pass(settings: Settings) -> None:
    first_loss = lost_job(settings, attempts=1)
    report, sent = step(settings)
    assert (sent, report.requeued_lost, report.waiting_suspects) == ([], 0, 0)
    assert get(settings, first_loss).status == "running"


def test_send_next_suspect_ends_a_waiting_suspect_the_client_canceled(settings: Settings) -> None:
    canceled = lost_job(settings, attempts=2)
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == canceled).values(cancel_requested=True))
    report, sent = step(settings)
    assert (report.canceled, sent) == (1, [])
    assert get(settings, canceled).status == "canceled"


def reconcile(
    settings: Settings, present: set[str] | None, *, snapshot_failed: bool = False
) -> tuple[service.ReconcileReport, list[uuid.UUID]]:
    """One full pass given the broker's snapshot (None: it cannot be inspected)."""
    sent: list[uuid.UUID] = []
    with session_scope(settings) as session:
        report = service.reconcile(
            session=session,
            settings=settings,
            present=present,
            enqueue=sent.append,
            snapshot_failed=snapshot_failed,
        )
    return report, sent


def test_reconcile_resends_a_missing_job_stamped_by_a_fast_api_clock(settings: Settings) -> None:
    # Regression: `created_at` is the API host's clock and the cutoff the database's, so a job
    # submitted on a host running 2 h fast waited 2 h before its lost message was re-sent.
    fast = make_job(settings, age_s=-2 * 3600)
    grace = service.enqueue_grace_seconds(settings)
    slightly_fast = make_job(settings, age_s=-grace / 2)  # within the grace: maybe still young
    young = make_job(settings, age_s=0)
    report, sent = reconcile(settings, present=set())
    assert (report.requeued_missing, sent) == (1, [fast])
    assert {get(settings, i).enqueued_at is None for i in (slightly_fast, young)} == {True}
    report, sent = reconcile(settings, present=set())  # re-sent once, not on every pass
    assert sent == []


def test_reconcile_without_a_broker_snapshot_resends_a_suspect_queued_for_a_lease(
    settings: Settings,
) -> None:
    # Without Redis nothing shows that a re-sent suspect's message is gone (a worker took it
    # before the re-send committed and claimed nothing, or died holding it); the suspect would
    # hold the quarantine for ever.
    lease = timedelta(seconds=settings.job_lease_seconds)
    stale = make_job(settings, attempts=2, enqueued_at=utcnow() - lease - timedelta(seconds=1))
    recent = make_job(settings, attempts=2, enqueued_at=utcnow() - lease / 2)
    first_loss = make_job(settings, attempts=1, enqueued_at=utcnow() - lease / 2)
    report, sent = reconcile(settings, present=None)
    assert (report.requeued_missing, sent) == (1, [stale])
    stamp = get(settings, stale).enqueued_at
    assert stamp is not None
    assert stamp > utcnow() - timedelta(seconds=5)
    assert reconcile(settings, present=None)[1] == []  # once a lease
    assert {get(settings, i).status for i in (stale, recent, first_loss)} == {"queued"}


def test_reconcile_recovers_a_lost_job_behind_a_full_pass_of_waiting_suspects(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting suspects stay running with expired leases. Read with the other lost jobs, oldest
    first, up to the pass's limit, they filled it on every pass: a job lost later, or a suspect
    in flight that crashed its worker again, waited until every suspect had drained."""
    monkeypatch.setattr(service, "MAX_JOBS_PER_PASS", 2)
    in_flight = make_job(settings, attempts=2, enqueued_at=utcnow())  # holds the quarantine
    waiting = [lost_job(settings, attempts=2, age_s=90 - i) for i in range(3)]
    lost_again = lost_job(settings, attempts=settings.job_max_attempts, age_s=30)
    first_loss = lost_job(settings, attempts=1, age_s=10)
    report, sent = reconcile(settings, present={str(in_flight)})
    assert sent == [first_loss]
    assert (report.requeued_lost, report.failed, report.waiting_suspects) == (1, 1, 1)
    assert get(settings, lost_again).error_code == "poison_input"
    assert {get(settings, i).status for i in waiting} == {"running"}


def test_reconcile_without_a_broker_snapshot_resends_a_job_queued_for_a_lease(
    settings: Settings,
) -> None:
    """Without Redis nothing shows that a queued job's message is gone (a worker killed holding
    it prefetched: the SQLAlchemy transport keeps it hidden for good; a failed enqueue after the
    commit): a job queued for a lease without being sent is sent again, once a lease, up to
    the pass's limit, oldest first."""
    lease = timedelta(seconds=settings.job_lease_seconds)
    never_sent = make_job(settings, age_s=lease.total_seconds() + 60)
    sent_long_ago = make_job(
        settings, age_s=3 * lease.total_seconds(), enqueued_at=utcnow() - 2 * lease
    )
    young = make_job(settings, age_s=lease.total_seconds() / 2)
    sent_lately = make_job(
        settings, age_s=2 * lease.total_seconds(), enqueued_at=utcnow() - lease / 2
    )
    canceled = make_job(settings, age_s=2 * lease.total_seconds(), cancel_requested=True)
    report, sent = reconcile(settings, present=None)
    assert sent == [sent_long_ago, never_sent]
    assert report.requeued_missing == 2
    assert get(settings, canceled).status == "canceled"
    assert {get(settings, i).enqueued_at is None for i in (young,)} == {True}
    assert get(settings, sent_lately).status == "queued"
    assert reconcile(settings, present=None)[1] == []  # once a lease


def test_a_failed_redis_snapshot_sends_no_queued_job_for_want_of_its_message(
    settings: Settings,
) -> None:
    """Redis could not be read this pass (a failover, a timeout on a long list): that is no
    sign the messages are gone. Sending every queued job older than a lease again put
    thousands of duplicates on the queue (and KEDA scaled to its maximum for them)."""
    lease = timedelta(seconds=settings.job_lease_seconds)
    waiting = [make_job(settings, age_s=lease.total_seconds() + 60) for _ in range(3)]
    report, sent = reconcile(settings, present=None, snapshot_failed=True)
    assert (report.requeued_missing, sent) == (0, [])
    assert {get(settings, i).status for i in waiting} == {"queued"}


def test_jobs_resent_for_want_of_a_broker_to_inspect_are_capped_per_pass(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Redis the re-sends go out inside the pass's transaction (make run: SQLite
    inserts under its write lock), so a pass sends at most STALE_RESENDS_PER_PASS."""
    monkeypatch.setattr(service, "STALE_RESENDS_PER_PASS", 2)
    lease = timedelta(seconds=settings.job_lease_seconds)
    waiting = [make_job(settings, age_s=lease.total_seconds() + 60 + i) for i in range(3)]
    assert reconcile(settings, present=None)[1] == [waiting[2], waiting[1]]


@pytest.mark.parametrize("attempts", [1, 3])  # requeued, or ended (SEG_JOB_MAX_ATTEMPTS 3)
def test_a_lost_job_claimed_again_since_the_scan_is_left_to_its_worker(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, attempts: int
) -> None:
    """Where the scan's row locks do nothing (SQLite: `make run` starts a reconciler in two
    workers), another pass had requeued the job and a worker had claimed it again by the time
    this pass wrote: it was reset under the worker (its result fenced out and thrown away) and
    sent again, or ended failed while it ran."""
    job_id = lost_job(settings, attempts=attempts)
    worker_token = uuid.uuid4()
    scanned = service._suspect_in_flight

    def claimed_meanwhile(*, session: Session, now: datetime) -> bool:
        session.execute(  # as a worker's claim: running again, on a live lease
            update(Job)
            .where(Job.id == job_id)
            .values(lease_token=worker_token, lease_expires_at=utcnow() + timedelta(minutes=2))
        )
        return scanned(session=session, now=now)

    monkeypatch.setattr(service, "_suspect_in_flight", claimed_meanwhile)
    report, sent = reconcile(settings, present=set())
    assert sent == []
    assert (report.requeued_lost, report.failed) == (0, 0)
    job = get(settings, job_id)
    assert (job.status, job.lease_token) == ("running", worker_token)
