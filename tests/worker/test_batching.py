"""Micro-batching in a real worker process on real Redis and Postgres."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from segsvc.models import JobStatus
from segsvc.queue import enqueue_job, enqueue_jobs, make_celery
from segsvc.settings import Settings
from tests.conftest import start_worker, stop_process
from tests.worker.test_segmenter import make_jobs, rows

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}


def wait_all(settings: Settings, ids: list[uuid.UUID], timeout: float = 120.0) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = rows(settings, ids)
        if all(j.status in TERMINAL for j in jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"jobs not finished: {[j.status for j in rows(settings, ids)]}")


def assert_only_the_broken_job_failed(bad: Any, good: list[Any], log_path: Path) -> None:
    log = log_path.read_text()[-3000:]
    assert bad.status == JobStatus.FAILED, log
    assert bad.error_code == "poison_input"
    assert all(j.status == JobStatus.SUCCEEDED and j.attempts == 1 for j in good), log


def test_worker_batches_waiting_jobs_and_fails_only_the_bad_one(
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    ids = make_jobs(settings, 8, broken=1)
    app = make_celery(settings)
    for job_id in [*ids, ids[1]]:  # the last one is a duplicate delivery
        enqueue_job(app, job_id, settings=settings)
    proc = start_worker(settings, tmp_path / "worker.log")
    try:
        bad, *good = wait_all(settings, ids)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        stop_process(proc)
    assert_only_the_broken_job_failed(bad, good, tmp_path / "worker.log")
    forward_passes = sum(1 / (j.batch_size or 1) for j in good)
    assert forward_passes < len(good) - 1, [j.batch_size for j in good]
    assert "tensorflow" not in maps  # the worker serves the ONNX artifact without TensorFlow


def test_worker_runs_a_lone_job_without_waiting(
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    """A partial batch may wait 10 s for more jobs here; a lone job on an idle queue waits
    for none (the broker round trip and the claim are all its queue time)."""
    proc = start_worker(settings, tmp_path / "worker.log", SEG_BATCH_MAX_WAIT_MS="10000")
    try:
        (job_id,) = make_jobs(settings, 1)
        enqueue_job(make_celery(settings), job_id, settings=settings)
        (job,) = wait_all(settings, [job_id])
    finally:
        stop_process(proc)
    assert job.status == JobStatus.SUCCEEDED
    assert job.batch_size == 1
    assert job.queue_ms is not None
    assert job.queue_ms < 5000  # not the 10 s a partial batch may wait


def test_worker_settles_a_many_id_message_once_all_are_stored(
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    """A batch submit's message carries every id; with a small max batch its jobs run in several
    batches, and the message is acknowledged only after the last of them is stored."""
    ids = make_jobs(settings, 7, broken=1)
    enqueue_jobs(make_celery(settings), ids, settings=settings)
    proc = start_worker(settings, tmp_path / "worker.log", SEG_BATCH_MAX_SIZE="3")
    broker = redis.Redis.from_url(settings.broker_url or "")
    seen: list[tuple[int, int]] = []  # (messages unacknowledged, jobs ended), in that order
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            unacked = broker.hlen("unacked")
            ended = sum(j.status in TERMINAL for j in rows(settings, ids))
            seen.append((unacked, ended))
            if ended == len(ids) and not unacked:  # the ack follows the last batch's commit
                break
            time.sleep(0.01)
        bad, *good = rows(settings, ids)
    finally:
        stop_process(proc)
    assert_only_the_broken_job_failed(bad, good, tmp_path / "worker.log")
    sizes = [j.batch_size for j in good]
    assert None not in sizes
    assert max(sizes) <= 3  # type: ignore[type-var]
    assert seen[-1] == (0, len(ids))
    # Once taken, never acknowledged while some of its jobs were still to run or store (the
    # samples before the worker took it may read 0 unacknowledged around the first job's end).
    taken = next(i for i, s in enumerate(seen) if s[0] > 0)
    assert not [s for s in seen[taken:] if s[0] == 0 and 0 < s[1] < len(ids)], seen
    assert broker.llen(settings.queue_name) == 0
