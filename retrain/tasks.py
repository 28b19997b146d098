"""Celery tasks of the feedback loop (retrain, canary verdict, input retention) and their schedule.

`worker.celery_app` imports this module and installs `beat_schedule(settings)`; beat (exactly
one process) sends the tasks by name to the `maintenance` queue, which a worker of its own
consumes so that a training run never blocks inference. No TensorFlow at import time.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol

from celery import shared_task
from celery.schedules import crontab
from sqlalchemy.orm import Session

from segsvc.blobs import BlobStoreUnavailableError, blob_store
from segsvc.db import session_scope
from segsvc.metrics import (
    RETRAIN_LAST_SUCCESS,
    RETRAIN_RESULTS,
    RETRAIN_RUNS,
    RETRAIN_SUCCESS,
)
from segsvc.queue import RETRAIN
from segsvc.services import feedback, retention, rollout
from segsvc.settings import Settings, get_settings, parse_cron

log = logging.getLogger(__name__)

MAINTENANCE_QUEUE = "maintenance"
CANARY_CHECK = "segsvc.canary_check"
PURGE_INPUTS = "segsvc.purge_inputs"
DELETE_EXPIRED_JOBS = "segsvc.delete_expired_jobs"
SWEEP_BLOBS = "segsvc.sweep_blobs"
CANARY_CHECK_SECONDS = 30.0
# A blob file used within this stays: an upload reusing it (identical bytes) refreshes its
# mtime before its row commits.
BLOB_GRACE_S = 3600.0
# The daily sweep keeps files written or reused within a day, as `segsvc blobs sweep` does by
# default: an upload's file is written before its row commits, and the sweep reads the rows
# before it lists the files.
SWEEP_GRACE_S = 24 * 3600.0
# The least grace a sweep takes: a file written for an upload whose row has not committed yet
# is named by no row, and only its age keeps it.
MIN_SWEEP_GRACE_S = 3600.0


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic tasks of the feedback loop (times in UTC: the Celery config enables UTC)."""
    to_queue = {"queue": MAINTENANCE_QUEUE}
    return {
        "segsvc-retrain": {
            "task": RETRAIN,
            "schedule": parse_cron(settings.retrain_cron),
            "kwargs": {"trigger": "schedule"},
            "options": {**to_queue, "expires": 6 * 3600},
        },
        "segsvc-canary-check": {
            "task": CANARY_CHECK,
            "schedule": CANARY_CHECK_SECONDS,
            # A check that waited past the next one is redundant.
            "options": {**to_queue, "expires": CANARY_CHECK_SECONDS},
        },
        "segsvc-purge-inputs": {
            "task": PURGE_INPUTS,
            "schedule": crontab(minute="17"),
            "options": {**to_queue, "expires": 3600},
        },
        "segsvc-delete-expired-jobs": {
            "task": DELETE_EXPIRED_JOBS,
            "schedule": crontab(minute="47"),
            "options": {**to_queue, "expires": 3600},
        },
        "segsvc-sweep-blobs": {
            "task": SWEEP_BLOBS,
            "schedule": crontab(minute="7", hour="5"),  # after the 03:00 retraining
            "options": {**to_queue, "expires": 6 * 3600},
        },
    }


# Acknowledged on receipt, not after (acks_late is every other task's default): a run longer
# than the broker's visibility timeout (1 h) was delivered again and ran a second time. A run
# whose worker dies is marked interrupted by the next one, which beat sends the next day.
@shared_task(name=RETRAIN, ignore_result=True, acks_late=False)
def retrain_task(trigger: str = "schedule") -> dict[str, Any]:
    """One retraining run; a run already in progress makes this one a logged no-op."""
    from retrain.pipeline import RetrainBusyError, run_retraining

    try:
        result = run_retraining(get_settings(), trigger=trigger).to_dict()
    except RetrainBusyError as exc:
        log.info("retrain skipped: %s", exc)
        record_run("busy")
        return {"status": "busy", "reason": exc.message}
    except Exception:
        record_run("error")
        raise
    log.info("retrain: %s", result)
    record_run(str(result["status"]))
    return result


def record_run(result: str) -> None:
    """Count a run by its result (`segsvc_retrain_runs_total`; a status it does not know as
    `error`, keeping the label bounded) and stamp a successful one's end."""
    RETRAIN_RUNS.labels(result if result in RETRAIN_RESULTS else "error").inc()
    if result in RETRAIN_SUCCESS:
        RETRAIN_LAST_SUCCESS.set(time.time())


@shared_task(name=CANARY_CHECK, ignore_result=True)
def canary_check() -> dict[str, Any] | None:
    """Promote or roll back the canary once it has served enough jobs."""
    settings = get_settings()
    with session_scope(settings) as session:
        verdict = rollout.decide_canary(
            session=session,
            min_jobs=settings.canary_min_jobs,
            latency_ratio=settings.gate_latency_ratio,
        )
    if verdict is not None and verdict.outcome != "waiting":
        log.info("canary %s %s: %s", verdict.version, verdict.outcome, verdict.reason)
    return verdict.to_dict() if verdict else None


@shared_task(name=PURGE_INPUTS, ignore_result=True)
def purge_inputs() -> int:
    """Delete stored inputs of old jobs nobody labeled (settings.retention_days), and with the
    `fs` blob store their files, unless a job still names one (an identical upload's input, or
    a result mask with the same bytes)."""
    settings = get_settings()
    with session_scope(settings) as session:
        cutoff = feedback.purge_cutoff(session=session, retention_days=settings.retention_days)
    jobs, files = clear_in_chunks(settings, partial(feedback.purge_unlabeled_chunk, cutoff=cutoff))
    log.info(
        "deleted the stored inputs of %d unlabeled jobs older than %d days (%d blob files)",
        jobs,
        settings.retention_days,
        files,
    )
    return jobs


class ChunkStep(Protocol):
    """One chunk of a retention pass, from `after` (None: the start)."""

    def __call__(
        self, *, session: Session, after: tuple[datetime, uuid.UUID] | None
    ) -> retention.Cleared: ...


def clear_in_chunks(settings: Settings, chunk: ChunkStep) -> tuple[int, int]:
    """Run a retention pass chunk by chunk, one transaction each, every chunk starting where
    the last one ended, and after each commit delete the blob files no job names any more:
    (rows cleared, files deleted). A pass over a backlog so never holds more than one chunk's
    row locks."""
    jobs = files = 0
    after = None
    while True:
        with session_scope(settings) as session:
            cleared = chunk(session=session, after=after)
        jobs += cleared.jobs
        if cleared.files:
            files += _delete_unnamed_files(settings, cleared.files)
        if cleared.resume is None:
            return jobs, files
        after = cleared.resume


def _delete_unnamed_files(settings: Settings, digests: list[str]) -> int:
    """Delete the blob files among `digests` that no job names any more (after the rows that
    named them committed); the count. A filesystem error (or a folder that is not the store,
    `segsvc.blob_mark`) is logged and the pass goes on: the
    rows are gone either way, and `segsvc blobs sweep` deletes files it left."""
    with session_scope(settings) as session:
        kept = feedback.blobs_in_use(session=session, digests=digests)
    try:
        return blob_store(settings).delete(
            [d for d in digests if d not in kept], older_than_s=BLOB_GRACE_S
        )
    except (OSError, BlobStoreUnavailableError):  # the volume away, or not the store
        log.warning(
            "could not delete %d blob files; `segsvc blobs sweep` will", len(digests), exc_info=True
        )
        return 0


@shared_task(name=DELETE_EXPIRED_JOBS, ignore_result=True)
def delete_expired_jobs() -> int:
    """Delete ended jobs older than settings.job_retention_days (0: none) that have no mask
    label, with their webhook log and ratings, and with the `fs` blob store the files they
    named that no other job names."""
    return expire_jobs(get_settings())


def expire_jobs(settings: Settings) -> int:
    """`delete_expired_jobs` for these settings; the count of jobs deleted."""
    if settings.job_retention_days == 0:
        return 0
    with session_scope(settings) as session:
        cutoff = feedback.purge_cutoff(session=session, retention_days=settings.job_retention_days)
    # Pending webhook messages whose retries are still on (since their event or a redeliver)
    # keep their jobs; one stuck pending longer (no webhook worker running) does not.
    now = cutoff + timedelta(days=settings.job_retention_days)
    retried_since = now - timedelta(seconds=settings.webhook_max_age_seconds)
    jobs = files = 0
    for status in retention.ENDED:
        status_jobs, status_files = clear_in_chunks(
            settings,
            partial(
                retention.delete_ended_jobs_chunk,
                status=status,
                cutoff=cutoff,
                retried_since=retried_since,
            ),
        )
        jobs, files = jobs + status_jobs, files + status_files
    log.info(
        "deleted %d ended jobs older than %d days (%d blob files)",
        jobs,
        settings.job_retention_days,
        files,
    )
    return jobs


@shared_task(name=SWEEP_BLOBS, ignore_result=True)
def sweep_blobs() -> int:
    """Daily: delete the blob files no job names (`sweep_unnamed_blobs`)."""
    return sweep_unnamed_blobs(get_settings())


def sweep_unnamed_blobs(settings: Settings, *, older_than_s: float = SWEEP_GRACE_S) -> int:
    """Delete the blob files no job names any more and not used within `older_than_s` (a day
    by default); the count. Daily from beat, and `segsvc blobs sweep` by hand. Retention
    deletes the files of the rows it clears, but not those no row ever named: the file of an
    upload whose request then failed (a 409 for a concurrent idempotent twin, a 503, a lost
    commit) or of a mask whose store was rolled back, and temporary files of interrupted
    writes. Nothing to do without an `fs` blob folder."""
    if older_than_s < MIN_SWEEP_GRACE_S:
        raise ValueError(
            f"a blob sweep keeps files written in the last {MIN_SWEEP_GRACE_S / 3600:g} h at "
            "least: an upload's file is written before its row commits"
        )
    store = blob_store(settings)
    if not store.holds_files():
        return 0

    def in_use(digests: list[str]) -> set[str]:
        # A short transaction per batch of old files: none waits on the walk of the folder.
        with session_scope(settings) as session:
            return feedback.blobs_in_use(session=session, digests=digests)

    removed = store.sweep_checked(in_use, older_than_s=older_than_s)
    log.info("deleted %d blob files no job names", removed)
    return removed
