"""The reconciler: a pass when each worker (inference or maintenance) starts and then every
`reconcile_interval_seconds` from a thread of the worker itself; beat sends none. A Redis key
lets one pass start per interval across all of them, and Postgres' advisory lock keeps passes
from overlapping (a pass waits a few seconds for it, so a quarantine step holding it does not
cost the interval its pass). While a pass left suspects waiting, the worker that ran it also
runs the quarantine's step alone every `SUSPECT_STEP_SECONDS`, under the same lock. The task
`segsvc.reconcile` remains for sending a pass by hand."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import click
from celery import Celery
from sqlalchemy.orm import Session

from segsvc import notify
from segsvc.db import session_scope
from segsvc.metrics import JOBS_FINISHED
from segsvc.queue import RECONCILE, enqueue_job
from segsvc.services import reconcile
from segsvc.settings import Settings, is_redis_url
from worker.celery_app import app, settings

log = logging.getLogger(__name__)

# While suspects wait, how often the quarantine's step runs (at most once an interval): the next
# suspect goes within this long of the one in flight ending, not at the next pass (one per 30 s
# drained a crashed pipeline's 96 retried jobs in 48 minutes).
SUSPECT_STEP_SECONDS = 2.0


# How long a due pass waits for the lock: a quarantine step holds it for a few indexed reads
# and at most one send, and a pass that gave up for it would leave its interval without one
# (its turn is taken). Another pass holding it longer means one just ran: this one skips.
PASS_LOCK_WAIT_SECONDS = 5.0
# Sends after a commit that may fail in a row before the pass leaves the rest to the next one:
# the broker is away, and each try can take its connect timeout twice (5 s, one retry).
MAX_FAILED_SENDS_IN_A_ROW = 3


def broker_inspectable(cfg: Settings) -> bool:
    """Whether a pass can see which jobs have a message in the broker (Redis only)."""
    return is_redis_url(cfg.celery_broker_url)


def broker_snapshot(cfg: Settings) -> set[str] | None:
    """Job ids with a live message in Redis; None when the broker is not Redis."""
    if not broker_inspectable(cfg):
        return None
    import redis

    client = redis.Redis.from_url(cfg.celery_broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        return reconcile.broker_job_ids(
            client, queue=cfg.queue_name, stale_after_s=cfg.job_lease_seconds
        )
    finally:
        client.close()


Send = Callable[[uuid.UUID], None]


def run_reconcile(cfg: Settings, celery_app: Celery) -> dict[str, object]:
    """One reconciliation pass (it waits briefly for the lock, then skips)."""
    # Snapshot before the transaction opens, so that it does not sit idle while a deep queue
    # is read (and the lock wait only makes the snapshot older): a job enqueued between the
    # snapshot and the query is at worst sent twice, which the claim fence makes harmless.
    failed = False
    try:
        present = broker_snapshot(cfg)
    except Exception:  # Redis is down: the steps that need only Postgres still run
        log.warning(
            "could not read the broker; this pass ends and cancels jobs but looks for no "
            "missing messages",
            exc_info=True,
        )
        present, failed = None, True

    def full_pass(session: Session, enqueue: Send) -> reconcile.ReconcileReport:
        return reconcile.reconcile(
            session=session,
            settings=cfg,
            present=present,
            enqueue=enqueue,
            snapshot_failed=failed,
        )

    return _run_locked(
        cfg, celery_app, full_pass, quiet=("skipped",), lock_wait_s=PASS_LOCK_WAIT_SECONDS
    )


def run_suspect_step(cfg: Settings, celery_app: Celery) -> dict[str, object]:
    """The quarantine's step alone: send the next waiting suspect once none is in flight
    (skipped when another reconciler holds the lock)."""

    def step(session: Session, enqueue: Send) -> reconcile.ReconcileReport:
        return reconcile.send_next_suspect(session=session, settings=cfg, enqueue=enqueue)

    # Every few seconds while suspects wait: a line only when it ended or sent one.
    return _run_locked(cfg, celery_app, step, quiet=("skipped", "waiting_suspects"))


def _run_locked(
    cfg: Settings,
    celery_app: Celery,
    work: Callable[[Session, Send], reconcile.ReconcileReport],
    *,
    quiet: tuple[str, ...],
    lock_wait_s: float = 0.0,
) -> dict[str, object]:
    # The one advisory lock serializes passes and suspect steps on every worker: a step sees
    # what the last one sent (committed before the lock is released), so only one suspect is
    # ever in flight.
    #
    # When re-sends go out. The requeue UPDATEs run at once (Core statements, not flushed at the
    # commit), so each row is locked before its message goes; but other transactions see it
    # `queued` only once committed, and a claim skips a row whose committed state it may not
    # take: a suspect's (running, lease expired, lost twice). A worker quick to take a suspect's
    # message sent before the commit would claim nothing and drop the message.
    # - Redis: sent after the commit, each on its own. A send that fails, or a process that
    #   dies first, leaves the job queued without a message: the next pass's missing-message
    #   check re-sends it once the grace period has passed.
    # - Other brokers cannot be inspected, so nothing would notice that (and a queued suspect
    #   would hold the quarantine for ever): sent before the commit. A send that fails rolls the
    #   whole pass back and the next pass does it again; a claim of a job lost once waits on
    #   its row lock for the commit. A suspect's message taken too early is made good by
    #   `reconcile`, which re-sends a suspect left queued for a lease.
    after_commit = broker_inspectable(cfg)
    due: list[uuid.UUID] = []
    with session_scope(cfg) as session:
        if not reconcile.try_lock(session=session, wait_s=lock_wait_s):
            return {"skipped": True}
        report = work(session, due.append)
        suspects = report.suspect_ids
        if not after_commit:
            for job_id in due:
                _send(celery_app, cfg, job_id, suspect=job_id in suspects)
    _count_outcomes(report)  # committed: first, before anything after the commit can raise
    notify.publish_finished(cfg.effective_redis_url, report.ended_ids)  # their long polls
    counts = report.as_dict()
    if after_commit and (unsent := _send_each(celery_app, cfg, due, suspects)):
        counts["unsent"] = unsent
    if any(v for k, v in counts.items() if k not in quiet):
        log.warning("reconciler: %s (failed: %s)", counts, report.failed_ids[:20])
    return counts


def _count_outcomes(report: reconcile.ReconcileReport) -> None:
    """Add the jobs a committed pass or step ended to `segsvc_jobs_total`, beside those the
    workers store: its failed (lost too often: `worker_lost`, `poison_input`) and its canceled
    (a cancel requested of a lost job, or of one left queued after a release). Only once the
    commit is done: a pass rolled back ended nothing, and the next one ends them again."""
    for status, count in (("failed", report.failed), ("canceled", report.canceled)):
        if count:
            JOBS_FINISHED.labels(status).inc(count)


def _send_each(
    celery_app: Celery, cfg: Settings, job_ids: list[uuid.UUID], suspects: set[uuid.UUID]
) -> int:
    """Send each job's message; how many were not sent (the next pass re-sends those)."""
    unsent = failed_in_a_row = 0
    for done, job_id in enumerate(job_ids, start=1):
        try:
            _send(celery_app, cfg, job_id, suspect=job_id in suspects)
            failed_in_a_row = 0
        except Exception:
            log.warning("reconciler: could not send job %s", job_id, exc_info=True)
            unsent += 1
            failed_in_a_row += 1
            if failed_in_a_row >= MAX_FAILED_SENDS_IN_A_ROW and done < len(job_ids):
                log.warning(
                    "reconciler: broker away, %d sends left to the next pass", len(job_ids) - done
                )
                return unsent + len(job_ids) - done
    return unsent


def _send(celery_app: Celery, cfg: Settings, job_id: Any, *, suspect: bool = False) -> None:
    enqueue_job(celery_app, job_id, settings=cfg, suspect=suspect)


TURN_KEY = "segsvc:reconcile:turn"


def take_turn(cfg: Settings) -> bool:
    """True when no pass started within the last interval, so the caller runs one.

    A Redis key that expires a little before the interval ends marks the turn taken; without
    Redis, or with Redis down, every caller runs (the advisory lock still keeps passes apart,
    and a pass that finds nothing to do is cheap).
    """
    url = cfg.effective_redis_url
    if not url:
        return True
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        ttl_ms = max(1, int(cfg.reconcile_interval_seconds * 900))  # 0.9 of the interval
        return bool(client.set(TURN_KEY, "1", nx=True, px=ttl_ms))
    except redis.RedisError:
        return True
    finally:
        client.close()


@app.task(name=RECONCILE, ignore_result=True)
def reconcile_task() -> dict[str, object]:
    """A pass sent by hand, unless a worker's own loop ran one within the interval."""
    if not take_turn(settings):
        return {"skipped": True}
    return run_reconcile(settings, app)


def reconcile_periodically(
    cfg: Settings, celery_app: Celery, stop: threading.Event | None = None
) -> threading.Thread:
    """Run a pass now (a restarted worker recovers at once), then one every interval.

    This runs in a thread of each worker, not through the queue: a message on the inference
    queue would wait behind the backlog, and behind one longer than the interval every such
    message would expire before a worker took it, which is when a crashed worker's jobs most
    need re-sending (and a periodic message there would keep waking workers scaled to zero).
    All workers tick; `take_turn` lets one of them run. The worker whose pass left suspects
    waiting runs `run_suspect_step` every `SUSPECT_STEP_SECONDS` until none waits, so each
    suspect goes soon after the one before it ends (should that worker die, the next pass,
    on any worker, takes over).
    """
    stop = stop or threading.Event()
    interval = cfg.reconcile_interval_seconds

    def loop() -> None:
        first = True
        suspects_wait = False
        next_pass = time.monotonic()
        while not stop.is_set():
            due = time.monotonic() >= next_pass
            try:
                if due and (take_turn(cfg) or first):
                    counts = run_reconcile(cfg, celery_app)
                    suspects_wait = _still_waiting(counts, suspects_wait)
                elif not due and suspects_wait:
                    counts = run_suspect_step(cfg, celery_app)
                    suspects_wait = _still_waiting(counts, suspects_wait)
            except Exception:  # the next pass tries again
                log.warning("reconcile pass failed", exc_info=True)
                suspects_wait = False
            if due:
                next_pass = time.monotonic() + interval
            first = False
            pause = next_pass - time.monotonic()
            if suspects_wait:
                pause = min(pause, SUSPECT_STEP_SECONDS)
            stop.wait(max(0.0, pause))

    thread = threading.Thread(target=loop, name="seg-reconcile", daemon=True)
    thread.start()
    return thread


def _still_waiting(counts: dict[str, object], before: bool) -> bool:
    """Whether suspects wait after a pass or step (unknown when it was skipped: as before)."""
    if counts.get("skipped"):
        return before
    return bool(counts.get("waiting_suspects"))


@click.command("reconcile")
def reconcile_command() -> None:
    """Run one reconciliation pass now and print what it did."""
    click.echo(run_reconcile(settings, app))
