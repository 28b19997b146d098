"""Reconciliation: Postgres is the truth, so jobs the broker lost are found there and re-sent.

Two ways a job gets stuck: its message vanished (Redis restarted or flushed, the enqueue after
commit failed, a worker died holding it unacknowledged), or the worker running it died (its lease
expires). Both are re-enqueued. Each claim counts an attempt; a claim the worker gave back (its
forward pass or result write failed: `releases`) is not a lost run. A job that keeps being lost
ends failed. A job lost twice is a suspect (it may be what kills the worker): suspects are re-sent
one at a time, each in a message that says so (`ReconcileReport.suspect_ids`: the worker runs it
with no other job), and a suspect that is lost again on its last attempt ends `poison_input`.
Between passes the reconciler runs `send_next_suspect` every few seconds while suspects wait, so
they drain one after another instead of one per pass.

Leases are granted and judged on the database's clock (`models.db_now`), never a host's; a job's
`created_at` is on it too (`models.db_clock`: a reading carried forward, right to milliseconds).
Jobs stored by API hosts of earlier releases carry their host's clock, which
`_requeue_missing` allows for.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, literal, or_, select, text, tuple_, update
from sqlalchemy.orm import Session

from segsvc.models import ENDED_JOB_CLEARS, Job, JobStatus, db_time
from segsvc.settings import Settings
from segsvc.webhooks.outbox import JOB_COMPLETED, record_job_events

# Any advisory-lock key works as long as every reconciler uses the same one.
LOCK_KEY = 0x5E65_7EC0
# How often a reconciler waiting for the lock (`try_lock(wait_s=...)`) tries again.
LOCK_POLL_S = 0.05
# A lost job is a suspect once it was lost this many times: it then runs with no other suspect.
# The partial index `ix_jobs_suspect_status_lease` (`models.SUSPECT_WHERE`) spells it out too.
SUSPECT_AFTER_ATTEMPTS = 2
# Bounded work per pass; the next pass picks up the rest.
MAX_JOBS_PER_PASS = 5000
# Queued jobs re-sent a pass for want of a way to see their messages (`_resend_stale`).
STALE_RESENDS_PER_PASS = 200
# Queued jobs read per query while looking for ones missing from the broker, and at most this
# many queries per pass.
PAGE_SIZE = 5000
MAX_PAGES_PER_PASS = 40
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class ReconcileReport:
    """What one pass did."""

    requeued_missing: int = 0
    requeued_lost: int = 0
    waiting_suspects: int = 0
    failed: int = 0
    canceled: int = 0
    skipped: bool = False
    failed_ids: list[str] = field(default_factory=list)
    ended_ids: list[str] = field(default_factory=list)  # failed or canceled: their long polls
    # Sent suspects: their messages say so, and a worker runs each with no other job.
    suspect_ids: set[uuid.UUID] = field(default_factory=set)

    def as_dict(self) -> dict[str, object]:
        """Counts for logs and task results."""
        return {
            "requeued_missing": self.requeued_missing,
            "requeued_lost": self.requeued_lost,
            "waiting_suspects": self.waiting_suspects,
            "failed": self.failed,
            "canceled": self.canceled,
            "skipped": self.skipped,
        }


def try_lock(*, session: Session, wait_s: float = 0.0) -> bool:
    """Take the reconciler lock for this transaction (one reconciler at a time), trying for up
    to `wait_s`; SQLite: always."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    deadline = time.monotonic() + wait_s
    while True:
        if session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LOCK_KEY}):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(LOCK_POLL_S)


def broker_job_ids(redis_client: object, *, queue: str, stale_after_s: float) -> set[str]:
    """Job ids that have a live message in Redis: waiting in the queue list, or delivered to a
    worker less than `stale_after_s` ago (older unacked messages belong to a dead worker)."""
    client = redis_client  # a redis.Redis; typed loosely so the API never needs the import
    found: set[str] = set()
    step = 1000
    start = 0
    while True:
        chunk = client.lrange(queue, start, start + step - 1)  # type: ignore[attr-defined]
        found.update(_ids_in(chunk))
        if len(chunk) < step:
            break
        start += step
    fresh = client.zrangebyscore(  # type: ignore[attr-defined]
        UNACKED_INDEX_KEY, time.time() - stale_after_s, "+inf"
    )
    if fresh:
        found.update(_ids_in(v for v in client.hmget(UNACKED_KEY, fresh) if v))  # type: ignore[attr-defined]
    return found


def _ids_in(messages: Iterable[bytes]) -> set[str]:
    # Celery puts the job id in the message headers (`argsrepr`) in plain text; task ids match
    # too, which is harmless: they are never job ids.
    return {m.decode() for raw in messages for m in _UUID.findall(raw)}


def reconcile(
    *,
    session: Session,
    settings: Settings,
    present: set[str] | None,
    enqueue: Callable[[uuid.UUID], None],
    now: datetime | None = None,
    snapshot_failed: bool = False,
) -> ReconcileReport:
    """One pass: end, cancel or re-enqueue lost jobs; `present` is None when the broker cannot
    be inspected (then messages are not looked for, but a job left queued for a lease without
    being sent is sent again). `snapshot_failed`: the broker (Redis) can be inspected but its
    snapshot failed this time: no queued job is sent for want of a message then, as most of a
    backlog older than a lease would be, thousands of duplicates at once. `now` defaults to
    the database's."""
    now = now or db_time(session)
    report = ReconcileReport()
    _handle_expired_leases(
        session=session, settings=settings, enqueue=enqueue, now=now, report=report
    )
    canceled = _cancel_requested(session=session, now=now)
    report.canceled += len(canceled)
    report.ended_ids += map(str, canceled)
    if present is not None:
        _requeue_missing(
            session=session,
            settings=settings,
            present=present,
            enqueue=enqueue,
            now=now,
            report=report,
        )
    else:
        _resend_stale_suspects(
            session=session, settings=settings, enqueue=enqueue, now=now, report=report
        )
        if not snapshot_failed:
            _resend_stale(
                session=session, settings=settings, enqueue=enqueue, now=now, report=report
            )
    return report


def send_next_suspect(
    *,
    session: Session,
    settings: Settings,
    enqueue: Callable[[uuid.UUID], None],
    now: datetime | None = None,
) -> ReconcileReport:
    """The quarantine alone: suspects whose lease expired are ended, or the oldest re-sent once
    no suspect is in flight. A few indexed reads: cheap enough to run every few seconds while
    suspects wait (the caller holds `try_lock`, which keeps one suspect in flight fleet-wide)."""
    report = ReconcileReport()
    _handle_expired_leases(
        session=session,
        settings=settings,
        enqueue=enqueue,
        now=now or db_time(session),
        report=report,
        suspects_only=True,
    )
    return report


def _handle_expired_leases(
    *,
    session: Session,
    settings: Settings,
    enqueue: Callable[[uuid.UUID], None],
    now: datetime,
    report: ReconcileReport,
    suspects_only: bool = False,
) -> None:
    expired = select(Job.id, lost_runs(), Job.cancel_requested).where(
        _status_is(JobStatus.RUNNING), Job.lease_expires_at < now
    )
    # Suspects and the other lost jobs are read apart, each up to the limit: waiting suspects
    # stay running with expired leases, and read together, oldest first, the same waiting ones
    # filled every pass's limit, so a job lost later was never recovered until they drained.
    # Among suspects those to end come first, for the same reason.
    ends = or_(Job.cancel_requested, lost_runs() >= settings.job_max_attempts)
    scans = [expired.where(_is_suspect()).order_by(ends.desc(), Job.created_at)]
    if not suspects_only:
        scans.insert(0, expired.where(~_is_suspect()).order_by(Job.created_at))
    lost = [
        row
        for scan in scans
        for row in session.execute(
            scan.limit(MAX_JOBS_PER_PASS).with_for_update(skip_locked=True)
        ).all()
    ]
    suspect_busy = _suspect_in_flight(session=session, now=now)
    # Each write below checks again that the job is running on an expired lease: where the
    # scan's locks do nothing (SQLite, whose `make run` starts a reconciler in two workers), a
    # job another pass had requeued and a worker had claimed again since was reset under the
    # worker, its result fenced out and thrown away, and sent twice.
    for job_id, runs_lost, cancel_requested in lost:
        if cancel_requested:
            if _finish(
                session, job_id, JobStatus.CANCELED, "canceled", "Canceled by the client.", now
            ):
                report.canceled += 1
                report.ended_ids.append(str(job_id))
        elif runs_lost >= settings.job_max_attempts:
            code, message = _lost_verdict(runs_lost)
            if _finish(session, job_id, JobStatus.FAILED, code, message, now):
                report.failed += 1
                report.failed_ids.append(str(job_id))
                report.ended_ids.append(str(job_id))
        elif runs_lost >= SUSPECT_AFTER_ATTEMPTS and suspect_busy:
            report.waiting_suspects += 1  # quarantine: one suspect at a time
        elif _mark_requeued(session, job_id, now, from_running=True):
            if runs_lost >= SUSPECT_AFTER_ATTEMPTS:
                suspect_busy = True
                report.suspect_ids.add(job_id)
            enqueue(job_id)
            report.requeued_lost += 1


def lost_runs() -> ColumnElement[int]:
    """Runs of a job that did not end (its worker died or stalled past the lease), counting a
    running job's current run: claims, less those the worker gave back."""
    return Job.attempts - Job.releases


# The scans below match partial indexes (migration 0005), so their constants are written into
# the SQL: psycopg prepares a statement run five times on one connection, and Postgres may then
# plan it once for any `status = $1`, a plan that cannot use an index made for one status.
def _status_is(status: JobStatus) -> ColumnElement[bool]:
    return Job.status == literal(status.value, literal_execute=True)


def _is_suspect() -> ColumnElement[bool]:
    return lost_runs() >= literal(SUSPECT_AFTER_ATTEMPTS, literal_execute=True)


def _lost_verdict(runs_lost: int) -> tuple[str, str]:
    if runs_lost > SUSPECT_AFTER_ATTEMPTS:
        return "poison_input", (
            f"The worker stopped while running this job {runs_lost} times, the last time with "
            "no other job beside it; the input is presumed to crash it."
        )
    if runs_lost == 1:  # SEG_JOB_MAX_ATTEMPTS=1: a single lost run ends the job
        return "worker_lost", "The worker running this job stopped before it finished."
    return "worker_lost", f"The worker running this job stopped {runs_lost} times."


def _suspect_in_flight(*, session: Session, now: datetime) -> bool:
    """A suspect already re-sent and not yet finished (queued, or running on a live lease).

    A running job's lost runs count its current one, which on a live lease is not lost (yet):
    a suspect running has lost runs one more than the suspect threshold. A job lost once and
    running again among other jobs has lost runs at the threshold, and is no suspect (as its
    claim says, `Claimed.suspect`); counted as one, it held every waiting suspect back."""
    live = or_(
        _status_is(JobStatus.QUEUED),
        and_(
            _status_is(JobStatus.RUNNING),
            Job.lease_expires_at >= now,
            lost_runs() > literal(SUSPECT_AFTER_ATTEMPTS, literal_execute=True),
        ),
    )
    # `_is_suspect()` as written: it is the partial index's predicate (`models.SUSPECT_WHERE`).
    row = session.scalar(select(Job.id).where(live, _is_suspect()).limit(1))
    return row is not None


def _resend_stale_suspects(
    *,
    session: Session,
    settings: Settings,
    enqueue: Callable[[uuid.UUID], None],
    now: datetime,
    report: ReconcileReport,
) -> None:
    """Without a broker to inspect: a suspect re-sent a lease ago and still queued may have lost
    its message (a worker that took it before the re-send committed claimed nothing; a worker
    killed holding it), and it holds the quarantine, so it is sent again. Behind a backlog it
    may only be waiting: a second message is harmless (the claim's fence)."""
    stale = now - timedelta(seconds=settings.job_lease_seconds)
    ids = session.scalars(
        select(Job.id).where(_is_suspect(), *_unsent_since(stale)).limit(MAX_JOBS_PER_PASS)
    ).all()
    _resend(session, ids, now=now, enqueue=enqueue, report=report, suspects=True)


def _resend_stale(
    *,
    session: Session,
    settings: Settings,
    enqueue: Callable[[uuid.UUID], None],
    now: datetime,
    report: ReconcileReport,
) -> None:
    """Without a broker to inspect: a queued job neither sent nor created within a lease may
    have lost its message (a worker killed holding it prefetched: the SQLAlchemy transport
    keeps such a message hidden for good; an enqueue after the commit that failed), and nothing
    else would ever send it again. So it is sent again, at most once a lease and
    `STALE_RESENDS_PER_PASS` a pass, oldest first; behind a backlog it may only be waiting, and a
    second message is harmless (the claim's fence). Such brokers are sent to inside the pass's
    transaction (the SQLAlchemy transport of `make run`: SQLite inserts under its write lock),
    hence the smaller limit. Suspects: `_resend_stale_suspects`."""
    stale = now - timedelta(seconds=settings.job_lease_seconds)
    ids = session.scalars(
        select(Job.id)
        .where(~_is_suspect(), Job.created_at < stale, *_unsent_since(stale))
        .order_by(Job.created_at, Job.id)
        .limit(STALE_RESENDS_PER_PASS)
    ).all()
    _resend(session, ids, now=now, enqueue=enqueue, report=report, suspects=False)


def _unsent_since(stale: datetime) -> tuple[ColumnElement[bool], ...]:
    """Queued, not canceled, and not sent since `stale` (or never sent)."""
    return (
        _status_is(JobStatus.QUEUED),
        Job.cancel_requested.is_(False),
        or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale),
    )


def _resend(
    session: Session,
    ids: Sequence[uuid.UUID],
    *,
    now: datetime,
    enqueue: Callable[[uuid.UUID], None],
    report: ReconcileReport,
    suspects: bool,
) -> None:
    """Send these queued jobs again (stamped as sent now), suspects flagged as such."""
    for job_id in ids:
        _mark_requeued(session, job_id, now, from_running=False)
        if suspects:
            report.suspect_ids.add(job_id)
        enqueue(job_id)
        report.requeued_missing += 1


def _requeue_missing(
    *,
    session: Session,
    settings: Settings,
    present: set[str],
    enqueue: Callable[[uuid.UUID], None],
    now: datetime,
    report: ReconcileReport,
) -> None:
    # A job committed a moment ago may still be on its way to the broker: give it a grace period.
    grace = timedelta(seconds=enqueue_grace_seconds(settings))
    cutoff = now - grace
    due = select(Job.created_at, Job.id, lost_runs()).where(
        _status_is(JobStatus.QUEUED),
        Job.cancel_requested.is_(False),  # the claim skips these; `_cancel_requested` ends them
        # Jobs of API hosts of earlier releases have `created_at` on their host's clock: a stamp
        # more than the grace in the future shows a fast clock, not a young job, and such a job
        # is due at once rather than hours late (a slow clock makes a job look older: it is at
        # worst sent twice, which the claim's fence makes harmless).
        or_(Job.created_at < cutoff, Job.created_at > now + grace),
        or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff),
    )
    # Page through the queued jobs oldest first (keyset on created_at, id): a backlog of more
    # than a page still in the broker must not hide a younger job whose message was lost.
    after: tuple[datetime, uuid.UUID] | None = None
    for _ in range(MAX_PAGES_PER_PASS):
        page = due if after is None else due.where(tuple_(Job.created_at, Job.id) > after)
        rows = session.execute(page.order_by(Job.created_at, Job.id).limit(PAGE_SIZE)).all()
        for _created, job_id, runs_lost in rows:
            if str(job_id) not in present:
                _mark_requeued(session, job_id, now, from_running=False)
                if runs_lost >= SUSPECT_AFTER_ATTEMPTS:
                    report.suspect_ids.add(job_id)
                enqueue(job_id)
                report.requeued_missing += 1
        if len(rows) < PAGE_SIZE or report.requeued_missing >= MAX_JOBS_PER_PASS:
            return
        after = (rows[-1][0], rows[-1][1])


def enqueue_grace_seconds(settings: Settings) -> float:
    """How long a queued job may be absent from the broker before it is re-sent."""
    return max(1.0, min(10.0, settings.reconcile_interval_seconds))


def _mark_requeued(
    session: Session, job_id: uuid.UUID, now: datetime, *, from_running: bool
) -> bool:
    """Whether the job was marked queued (and sent at `now`): a running one only while its
    lease is still expired (not claimed again since it was read)."""
    # Clearing the lease token fences out a worker that was only slow, not dead: its result
    # write no longer matches and is dropped.
    cond = (
        and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        if from_running
        else Job.status == JobStatus.QUEUED
    )
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, cond)
        .values(status=JobStatus.QUEUED, lease_token=None, lease_expires_at=None, enqueued_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def _cancel_requested(*, session: Session, now: datetime) -> list[uuid.UUID]:
    """Cancel the queued jobs a client canceled after a transient release (no worker would ever
    end them); their ids."""
    ids = session.scalars(
        update(Job)
        .where(_status_is(JobStatus.QUEUED), Job.cancel_requested.is_(True))
        .values(
            status=JobStatus.CANCELED,
            completed_at=now,
            error_code="canceled",
            error_message="Canceled by the client.",
            **ENDED_JOB_CLEARS,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    record_job_events(session=session, job_ids=list(ids), event=JOB_COMPLETED)
    return list(ids)


def _finish(
    session: Session, job_id: uuid.UUID, status: JobStatus, code: str, message: str, now: datetime
) -> bool:
    """End a lost job (still running on an expired lease); whether it did."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        .values(
            status=status,
            completed_at=now,
            error_code=code,
            error_message=message,
            lease_token=None,
            lease_expires_at=None,
            **ENDED_JOB_CLEARS,
        )
        .execution_options(synchronize_session=False)
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        return False
    record_job_events(session=session, job_ids=[job_id], event=JOB_COMPLETED)
    return True
