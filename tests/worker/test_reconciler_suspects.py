"""The quarantine in the workers' reconcile loops, on real Postgres and Redis: waiting suspects
drain one after another within seconds, never two in flight at once, across several workers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from sqlalchemy import text

from segsvc.db import session_scope
from segsvc.queue import make_celery
from segsvc.services import jobs as job_service
from segsvc.settings import Settings
from tests.segsvc.services.test_reconcile import lost_job
from tests.worker.test_reconciler import get, result
from worker import reconciler

pytestmark = pytest.mark.timeout(120)

# Suspects in flight: queued ones lost twice, and running ones on a live lease claimed after
# two lost runs (a running job's lost runs count its current run).
IN_FLIGHT = text(
    "SELECT count(*) FROM jobs WHERE (status = 'queued' AND attempts - releases >= 2) "
    "OR (status = 'running' AND lease_expires_at >= statement_timestamp() "
    "AND attempts - releases >= 3)"
)


class FakeWorker(threading.Thread):
    """An inference worker: takes each message off the queue, claims its jobs and stores a
    result, except that its process dies (the job stays claimed) on `poison`."""

    def __init__(self, settings: Settings, poison: uuid.UUID | None = None) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.poison = poison
        self.stop = threading.Event()
        self.claimed: list[uuid.UUID] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.take_messages()
        except BaseException as exc:  # surfaced by the test, not lost in a thread
            self.error = exc
            raise

    def take_messages(self) -> None:
        client = redis.Redis.from_url(self.settings.broker_url or "")
        while not self.stop.is_set():
            raw = client.rpop(self.settings.queue_name)
            if not isinstance(raw, bytes):  # the queue is empty
                time.sleep(0.01)
                continue
            for arg in json.loads(raw)["headers"]["argsrepr"].strip("[]").split(","):
                self.run_job(uuid.UUID(arg.strip(" '")))

    def run_job(self, job_id: uuid.UUID) -> None:
        dies = job_id == self.poison
        with session_scope(self.settings) as session:
            claimed = job_service.claim_jobs(
                session=session, job_ids=[job_id], lease_seconds=1 if dies else 60
            )
        if not claimed:  # a duplicate message: the fence runs nothing
            return
        self.claimed.append(job_id)
        if dies:
            return
        time.sleep(0.02)  # the forward pass
        with session_scope(self.settings) as session:
            job_service.complete_jobs(
                session=session, results=[result(job_id, claimed[0].lease_token)]
            )


class InFlightMonitor(threading.Thread):
    """Samples how many suspects are in flight (queued, or running on a live lease)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.stop = threading.Event()
        self.most = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            with session_scope(self.settings) as session:
                self.most = max(self.most, int(session.scalar(IN_FLIGHT) or 0))
            self.samples += 1
            time.sleep(0.005)


@contextmanager
def running(*threads: FakeWorker | InFlightMonitor) -> Iterator[None]:
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.stop.set()
            thread.join(10)


@contextmanager
def reconcile_loops(settings: Settings, workers: int) -> Iterator[None]:
    """Each worker's own reconcile thread, as `worker.celery_app` starts it."""
    stop = threading.Event()
    loops = [
        reconciler.reconcile_periodically(settings, make_celery(settings), stop)
        for _ in range(workers)
    ]
    try:
        yield
    finally:
        stop.set()
        for loop in loops:
            loop.join(10)


def wait_until_ended(settings: Settings, ids: list[uuid.UUID], timeout_s: float) -> float:
    """Seconds until every job in `ids` ended (fails the test after `timeout_s`)."""
    started = time.monotonic()
    while not all(get(settings, i).job_status.is_terminal for i in ids):
        waited = time.monotonic() - started
        statuses = [get(settings, i).status for i in ids]
        assert waited < timeout_s, f"after {waited:.0f} s: {statuses}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_waiting_suspects_drain_in_far_less_than_one_interval_each(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: suspects were sent one per pass, so a crashed pipeline's 96 retried jobs took
    # 96 reconcile intervals (48 minutes) to drain.
    cfg = settings.model_copy(update={"reconcile_interval_seconds": 60.0})
    monkeypatch.setattr(reconciler, "SUSPECT_STEP_SECONDS", 0.05)
    suspects = [lost_job(cfg, attempts=2, age_s=60 - i) for i in range(8)]
    worker = FakeWorker(cfg)
    with running(worker), reconcile_loops(cfg, workers=1):
        seconds = wait_until_ended(cfg, suspects, timeout_s=20)  # 8 intervals: 480 s
    assert worker.error is None
    assert [get(cfg, i).status for i in suspects] == ["succeeded"] * 8
    assert worker.claimed == suspects  # oldest first, each once
    assert seconds < cfg.reconcile_interval_seconds / 4


def test_two_suspects_are_never_in_flight_at_once_across_workers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three workers' loops run passes and suspect steps concurrently; one suspect still kills
    its worker: it ends `poison_input`, the others succeed, and no two ever run together."""
    cfg = settings.model_copy(update={"reconcile_interval_seconds": 0.5})
    monkeypatch.setattr(reconciler, "SUSPECT_STEP_SECONDS", 0.02)
    suspects = [lost_job(cfg, attempts=2, age_s=60 - i) for i in range(10)]
    poison = suspects[3]
    worker = FakeWorker(cfg, poison=poison)
    monitor = InFlightMonitor(cfg)
    with running(worker, monitor), reconcile_loops(cfg, workers=3):
        wait_until_ended(cfg, suspects, timeout_s=60)
    assert worker.error is None
    assert monitor.samples > 20
    assert monitor.most == 1
    job = get(cfg, poison)
    assert (job.status, job.error_code) == ("failed", "poison_input")
    assert [get(cfg, i).status for i in suspects if i != poison] == ["succeeded"] * 9
    assert sorted(worker.claimed) == sorted(suspects)  # each claimed once: never two at once


def sent_messages(settings: Settings) -> dict[str, dict[str, object]]:
    """The kwargs of each run_job message waiting in Redis, by the job id it carries."""
    import base64

    client = redis.Redis.from_url(settings.broker_url or "")
    found = {}
    for raw in client.lrange(settings.queue_name, 0, -1):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        (job_id,) = args
        found[job_id] = kwargs
    return found


def test_a_resent_suspect_s_message_says_it_runs_alone(settings: Settings) -> None:
    """The worker learns from the message that a job is a suspect, so it runs it with no other
    job; a job lost once is sent as any other."""
    suspect = lost_job(settings, attempts=2)
    once = lost_job(settings, attempts=1)
    counts = reconciler.run_reconcile(settings, make_celery(settings))
    assert counts["requeued_lost"] == 2
    assert sent_messages(settings) == {str(suspect): {"suspect": True}, str(once): {}}
    redis.Redis.from_url(settings.broker_url or "").delete(settings.queue_name)  # both lost
    with session_scope(settings) as session:  # past the grace period: missing from Redis
        session.execute(
            text(
                "UPDATE jobs SET created_at = created_at - interval '1 hour', "
                "enqueued_at = enqueued_at - interval '1 hour'"
            )
        )
    counts = reconciler.run_reconcile(settings, make_celery(settings))
    assert counts["requeued_missing"] == 2
    assert sent_messages(settings) == {str(suspect): {"suspect": True}, str(once): {}}
