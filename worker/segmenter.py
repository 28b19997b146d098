"""The Segmenter: loads the serving model once per process and runs micro-batches of jobs.

A batch runs in three stages so that they can overlap across batches:
`claim` (take the jobs, stack their inputs; ahead of the model when a full batch waits),
`forward` (one forward pass per model version; the model thread) and
`store` (argmax, mask resize, PNG encode, one transaction for every result; a post thread).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from segsvc import notify
from segsvc.blobs import blob_store
from segsvc.db import is_db_timeout, session_scope, statement_limits
from segsvc.metrics import BATCH_SIZE, JOBS_FINISHED, PREDICT_TIME, QUEUE_WAIT
from segsvc.ml import IMAGE_SIZE
from segsvc.ml.preprocess import (
    class_map,
    encode_mask_png,
    normalize,
    resize_mask,
    resized_class_fractions,
)
from segsvc.models import JobStatus
from segsvc.services import jobs as job_service
from segsvc.settings import Settings, get_settings
from worker.model_manager import LoadedModel, ModelManager

log = logging.getLogger(__name__)

INPUT_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
Claimed = job_service.Claimed
T = TypeVar("T")

# A store that timed out (the jobs table locked, say by a migration queued behind a long
# transaction) is tried once more, waiting for locks, but leaves this share of the lease to the
# release that follows if it fails again.
RELEASE_SHARE = 0.25
# A release that failed on a timeout or a lost connection is tried again after these pauses
# (doubling) until its batch's lease would expire.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0


@dataclass
class Group:
    """Jobs served by one model version and their logits from one forward pass."""

    model: LoadedModel
    jobs: list[Claimed]
    logits: npt.NDArray[np.float32]
    predict_ms: float


class Failure(NamedTuple):
    """A job that failed in its batch, and the version that ran it (None: no model ran it)."""

    job: Claimed
    code: str
    message: str
    model_version: str | None = None


@dataclass
class Claim:
    """A claimed batch: per model version its jobs and their stacked, normalized inputs."""

    claimed: int = 0
    # time.monotonic() just before the claim: its leases expire `job_lease_seconds` after this
    # at the earliest (they are granted on the database's clock, later).
    claimed_at: float = field(default_factory=time.monotonic)
    inputs: list[tuple[LoadedModel, list[Claimed], npt.NDArray[np.float32]]] = field(
        default_factory=list
    )
    failed: list[Failure] = field(default_factory=list)


@dataclass
class Inferred:
    """A batch after its forward passes, waiting to be stored."""

    claimed: int = 0
    claimed_at: float = field(default_factory=time.monotonic)  # as Claim's
    groups: list[Group] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


class Segmenter:
    """`load / predict / healthcheck` around the models, plus running batches of jobs."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.models = ModelManager(self.settings)
        self.blobs = blob_store(self.settings)

    # --- model --------------------------------------------------------------------------
    def load(self, *, retry: bool = False) -> LoadedModel:
        """Load the serving model(s); the worker is ready only after this. `retry`: try again
        even right after a failed first load (`ModelManager.load`)."""
        return self.models.load(retry=retry)

    def healthcheck(self) -> bool:
        """True once a model is loaded and answers."""
        if not self.models.loaded:
            return False
        out = self.load().runtime.predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))
        return bool(out.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3))

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Logits for a batch of model inputs (production model)."""
        return self.load().runtime.predict(batch)

    # --- jobs -------------------------------------------------------------------------------
    def run_jobs(self, job_ids: Sequence[str]) -> dict[str, int]:
        """Claim, predict in one forward pass, store results; returns counts by outcome."""
        return self.store(self.infer(job_ids))

    def infer(self, job_ids: Sequence[str]) -> Inferred:
        """Claim the jobs (duplicates and finished jobs drop out) and run the forward passes."""
        return self.forward(self.claim(job_ids))

    def claim(self, job_ids: Sequence[str], *, suspects: bool = True) -> Claim:
        """Claim the jobs and stack their model inputs per model version, ready for the model
        (the micro-batcher runs this for the next batch while the model runs the current one).
        `suspects=False`: leave a suspect unclaimed (`job_service.claim_jobs`)."""
        self.load()
        ids = list(dict.fromkeys(_parse_ids(job_ids)))
        if not ids:
            return Claim()
        claimed_at = time.monotonic()
        with session_scope(self.settings) as session:
            _relax_commit(session)
            claimed = job_service.claim_jobs(
                session=session,
                job_ids=ids,
                lease_seconds=self.settings.job_lease_seconds,
                max_attempts=self.settings.job_max_attempts,
                suspects=suspects,
            )
        try:
            return self._stack(claimed, claimed_at)
        except Exception:
            # Committed, so leased to this worker: give them back, or they would wait for the
            # lease to run out and each count a lost run (the caller only knows of a failure).
            self.release(Claim(failed=[Failure(job, "claim_failed", "") for job in claimed]))
            raise

    def _stack(self, claimed: list[Claimed], claimed_at: float) -> Claim:
        out = Claim(claimed=len(claimed), claimed_at=claimed_at)
        by_version: dict[str, tuple[LoadedModel, list[Claimed], list[Any]]] = {}
        for job in claimed:
            pixels = _model_input(job)
            if pixels is None:
                out.failed.append(
                    Failure(job, "poison_input", "The stored model input is malformed.")
                )
                continue
            model = self.models.model_for(job.id)
            entry = by_version.setdefault(model.version, (model, [], []))
            entry[1].append(job)
            entry[2].append(pixels)
        out.inputs = [
            (model, jobs, normalize(np.stack(pixels)))
            for model, jobs, pixels in by_version.values()
        ]
        return out

    def forward(self, claim: Claim) -> Inferred:
        """One forward pass per model version over a claimed batch."""
        out = Inferred(
            claimed=claim.claimed, claimed_at=claim.claimed_at, failed=list(claim.failed)
        )
        for model, jobs, inputs in claim.inputs:
            started = time.perf_counter()
            logits = model.runtime.predict(inputs)
            seconds = time.perf_counter() - started
            PREDICT_TIME.labels(model.version).observe(seconds)
            BATCH_SIZE.observe(len(jobs))
            out.groups.append(Group(model, jobs, logits, seconds * 1000.0))
        return out

    def store(self, batch: Inferred) -> dict[str, int]:
        """Masks, PNGs and class shares per job, then every outcome in one transaction."""
        results: list[dict[str, Any]] = []
        failed = list(batch.failed)
        for group in batch.groups:
            for job, classes in zip(group.jobs, class_map(group.logits), strict=True):
                try:
                    result = _result(job, classes, group, len(group.jobs))
                except Exception as exc:  # one bad job must not fail its batch
                    log.warning(
                        "job %s failed in post-processing",
                        job.id,
                        exc_info=True,
                        extra={"job_id": str(job.id), "request_id": job.request_id},
                    )
                    # The exception's text stays in the log: it may name paths or internals.
                    message = f"Preparing the result failed ({type(exc).__name__}); see the logs."
                    failed.append(Failure(job, "postprocess_failed", message, group.model.version))
                    continue
                # Outside the job's try: a storage error (a full disk, a network filesystem
                # away) is not the image's fault, so it fails the whole store, and the batch
                # is released and requeued like a database outage.
                result["mask_png"] = self.blobs.put(result["mask_png"])  # row or file
                results.append(result)
        if not results and not failed:
            return {"claimed": batch.claimed, "succeeded": 0, "failed": 0, "canceled": 0}
        states, failures_ended = self._write_outcomes(batch, results, failed)
        # A job canceled between its claim and this store ended canceled, without its result
        # (or its failure).
        results_canceled = sum(state["status"] == JobStatus.CANCELED for state in states.values())
        done = len(states) - results_canceled
        canceled = results_canceled + failures_ended[JobStatus.CANCELED]
        failures = failures_ended[JobStatus.FAILED]
        for result in results:  # the stored ones: a result fenced out ran elsewhere too
            state = states.get(str(result["id"]))  # keyed as the notices are
            if state is not None and state["status"] == JobStatus.SUCCEEDED:
                QUEUE_WAIT.observe(result["queue_ms"] / 1000.0)
        for failure in failed:
            log.warning(
                "job %s failed: %s",
                failure.job.id,
                failure.message,
                extra={"job_id": str(failure.job.id), "request_id": failure.job.request_id},
            )
        finished = [r["id"] for r in results] + [failure.job.id for failure in failed]
        # Long polls; the results' end states answer them without another read of the jobs.
        notify.publish_finished(self.settings.effective_redis_url, finished, states)
        for group in batch.groups:
            for job in group.jobs:  # one line per job: follow a request from API to worker
                log.info(
                    "job finished",
                    extra={
                        "job_id": str(job.id),
                        "model_version": group.model.version,
                        "request_id": job.request_id,
                        "batch_size": len(group.jobs),
                        "predict_ms": round(group.predict_ms, 2),
                    },
                )
        JOBS_FINISHED.labels("succeeded").inc(done)
        JOBS_FINISHED.labels("failed").inc(failures)
        if canceled:
            JOBS_FINISHED.labels("canceled").inc(canceled)
        return {
            "claimed": batch.claimed,
            "succeeded": done,
            "failed": failures,
            "canceled": canceled,
        }

    def release(self, batch: Claim | Inferred) -> None:
        """Give a batch's claimed jobs back to the queue (its forward pass or its storing
        failed, e.g. a GPU out of memory or a database outage; it will run again)."""
        if isinstance(batch, Claim):
            jobs = [job for _, group, _ in batch.inputs for job in group]
        else:
            jobs = [job for group in batch.groups for job in group.jobs]
        jobs += [failure.job for failure in batch.failed]
        if not jobs:
            return

        def give_back(session: Session) -> dict[uuid.UUID, JobStatus | None]:
            statuses = {
                job.id: job_service.give_back_job(
                    session=session, job_id=job.id, lease_token=job.lease_token
                )
                for job in jobs
            }
            return {i: s for i, s in statuses.items() if s != JobStatus.QUEUED}

        # The release is what keeps a database stall from counting against the jobs as a lost
        # run (and, repeated, from quarantining them as poison inputs): it waits for locks and
        # retries until the lease would expire, when the reconciler takes over anyway. Fenced
        # by the lease, so a retry after a commit whose answer was lost releases nothing twice.
        ended = self._retrying(give_back, until=self._lease_end(batch), what="releasing a batch")
        if ended:  # failed for good (or fenced out): long polls need not wait for their timeout
            notify.publish_finished(self.settings.effective_redis_url, list(ended))
        for status in (JobStatus.FAILED, JobStatus.CANCELED):  # ended here: counted here
            if n := sum(s == status for s in ended.values()):
                JOBS_FINISHED.labels(status.value).inc(n)

    def _write_outcomes(
        self,
        batch: Inferred,
        results: list[dict[str, Any]],
        failed: list[Failure],
    ) -> tuple[dict[str, Any], Counter[JobStatus]]:
        """Commit a batch's results and failures in one transaction; the end states of the
        jobs whose results it stored, by id (`job_service.complete_jobs`), and how many of the
        failures ended failed or canceled (their clients had asked to cancel them); a failure
        fenced out (the job taken over by another worker) ends nothing and is not counted.

        One that timed out is tried once more, waiting for locks until the last
        `RELEASE_SHARE` of the lease (kept for the release if it fails again): before the
        statement limits a store behind a lock simply waited and committed. Results are fenced
        by the lease, so a retry never writes over a job another worker took over."""

        def write(session: Session) -> tuple[dict[str, Any], Counter[JobStatus]]:
            done = job_service.complete_jobs(session=session, results=results)
            ended: Counter[JobStatus] = Counter()
            for failure in failed:
                status = job_service.fail_job(
                    session=session,
                    job_id=failure.job.id,
                    code=failure.code,
                    message=failure.message,
                    lease_token=failure.job.lease_token,
                    model_version=failure.model_version,
                )
                if status is not None:  # None: another worker holds the job now
                    ended[status] += 1
            return done, ended

        try:
            return self._transaction(write)
        except DBAPIError as exc:
            until = self._lease_end(batch) - RELEASE_SHARE * self.settings.job_lease_seconds
            if not is_db_timeout(exc) or until <= time.monotonic():
                raise
            log.warning(
                "storing a batch timed out (%s); trying once more, waiting up to %.0f s for locks",
                exc.orig,
                until - time.monotonic(),
            )
            return self._transaction(write, patient_until=until)

    def _retrying(self, write: Callable[[Session], T], *, until: float, what: str) -> T:
        """`write` in a transaction that waits for locks until `until` (time.monotonic()), tried
        again with growing pauses after a timeout or a lost connection until then."""
        pause = RETRY_FIRST_S
        while True:
            try:
                return self._transaction(write, patient_until=until)
            except DBAPIError as exc:
                if not _is_transient(exc) or time.monotonic() + pause >= until:
                    raise
                log.warning("%s failed (%s); trying again in %.1f s", what, exc.orig, pause)
            time.sleep(pause)
            pause = min(2 * pause, RETRY_MAX_S)

    def _transaction(
        self, write: Callable[[Session], T], *, patient_until: float | None = None
    ) -> T:
        """`write` in one transaction, under the role's statement limits or, with
        `patient_until`, waiting for locks until then."""
        with session_scope(self.settings) as session:
            if patient_until is not None:
                _wait_for_locks(session, self.settings, patient_until - time.monotonic())
            return write(session)

    def _lease_end(self, batch: Claim | Inferred) -> float:
        """When (time.monotonic()) the batch's leases expire, at the earliest."""
        return batch.claimed_at + self.settings.job_lease_seconds


def _wait_for_locks(session: Session, settings: Settings, seconds: float) -> None:
    """Let this transaction wait for locks (no `lock_timeout`) with every statement bounded by
    `seconds` instead of the role's `statement_timeout`; on Postgres only, where the role has
    limits at all (SQLite waits its `busy_timeout`), and only with time left: otherwise the
    role's limits stay, so a write late for its deadline is still tried once."""
    limits = statement_limits(settings)  # ms, 0 (or absent): none
    if (
        seconds <= 0
        or session.get_bind().dialect.name != "postgresql"
        or not (limits.get("lock_timeout") or limits.get("statement_timeout"))
    ):
        return
    session.execute(
        text(
            "SELECT set_config('lock_timeout', '0', true),"
            " set_config('statement_timeout', :ms, true)"
        ),
        {"ms": str(max(1, round(seconds * 1000)))},
    )


def _is_transient(exc: DBAPIError) -> bool:
    """A write worth trying again: a timeout, a lost connection, a deadlock or a restart."""
    return (
        is_db_timeout(exc)
        or exc.connection_invalidated
        or isinstance(exc, OperationalError | InterfaceError)
    )


def _relax_commit(session: Session) -> None:
    """Skip the WAL flush (~3.5 ms here) for the claim: if Postgres crashes before flushing it,
    the job is simply queued again and its unacknowledged message redelivered. Results are
    committed durably, and that flush also makes every earlier claim durable."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit = off"))


def _model_input(job: Claimed) -> npt.NDArray[np.uint8] | None:
    """The 128x128x3 uint8 input the API prepared (the worker never decodes uploads)."""
    if job.model_input is None or len(job.model_input) != INPUT_BYTES:
        return None
    return np.frombuffer(job.model_input, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3)


def _result(
    job: Claimed, classes: npt.NDArray[np.uint8], group: Group, size: int
) -> dict[str, Any]:
    mask = resize_mask(classes, job.width, job.height)
    queue_s = (job.started_at - job.created_at).total_seconds()
    return {
        "id": job.id,
        "lease_token": job.lease_token,
        "mask_png": encode_mask_png(mask),
        "class_fractions": resized_class_fractions(classes, job.width, job.height),
        "model_version": group.model.version,
        "queue_ms": queue_s * 1000.0,
        "predict_ms": group.predict_ms,
        "batch_size": size,
    }


def _parse_ids(raw: Sequence[str]) -> list[uuid.UUID]:
    out = []
    for value in raw:
        try:
            out.append(uuid.UUID(str(value)))
        except ValueError:
            log.warning("ignoring malformed job id %r", value)
    return out
