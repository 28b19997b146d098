"""The stamps that other hosts' stamps are compared with are on Postgres' clock: a job's
created_at (against its started_at, the reconciler's cutoffs, a canary's window), the
registry's promoted_at / retired_at (a canary's window starts at its promoted_at), feedback's
created_at, and the idempotency window (segsvc/models.py `db_clock`, `db_time`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from segsvc import models
from segsvc.db import get_engine, session_scope
from segsvc.images import ValidatedImage, validate_image
from segsvc.models import Job, JobStatus, ModelStatus, ModelVersion
from segsvc.services import feedback as feedback_service
from segsvc.services import idempotency, registry, rollout
from segsvc.services import jobs as job_service
from segsvc.settings import Settings
from tests.conftest import db_clock, sample_images
from tests.segsvc.test_rollout import add, canary

pytestmark = pytest.mark.timeout(60)

SKEW = timedelta(hours=3)
SLACK = timedelta(milliseconds=250)  # a carried-forward reading's error, generously


@contextmanager
def counted_clock_reads(settings: Settings) -> Iterator[list[str]]:
    """Every `statement_timestamp()` read the engine sends while the block runs."""
    reads: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT STATEMENT_TIMESTAMP()"):
            reads.append(statement)

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield reads
    finally:
        event.remove(engine, "before_cursor_execute", seen)


@pytest.fixture(autouse=True)
def fresh_readings() -> Iterator[None]:
    models._db_clock_readings.clear()
    yield
    models._db_clock_readings.clear()


def between(stamp: datetime | None, before: datetime, after: datetime) -> bool:
    assert stamp is not None
    return before - SLACK <= stamp <= after + SLACK


def photo() -> ValidatedImage:
    """A real pet photo, validated as the API validates an upload."""
    data = sample_images(1)[0].read_bytes()
    return validate_image(data, max_bytes=10**7, max_pixels=10**8)


def keyed(image: ValidatedImage, key: str) -> idempotency.IdempotentRequest:
    req = idempotency.parse_request(key, image_sha256=image.sha256, fields=[])
    assert req is not None
    return req


def new_jobs(settings: Settings, count: int = 1) -> list[Job]:
    with session_scope(settings) as session:
        return job_service.create_jobs(session=session, images=[photo()] * count)


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_jobs_are_created_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None], offset: timedelta
) -> None:
    skew_clock(offset)
    before = db_clock(settings)
    jobs = new_jobs(settings, 3)
    after = db_clock(settings)
    assert all(between(job.created_at, before, after) for job in jobs)
    with session_scope(settings) as session:  # as stored, not only as returned
        stored = session.get(Job, jobs[0].id)
        assert stored is not None
        assert between(stored.created_at, before, after)


def test_the_database_clock_is_read_once_a_minute_and_carried_forward(
    settings: Settings,
) -> None:
    before = db_clock(settings)
    with counted_clock_reads(settings) as reads:
        new_jobs(settings)
        later = new_jobs(settings, 2)
    after = db_clock(settings)
    assert len(reads) == 1  # the first submit's; the second carried it forward
    assert all(between(job.created_at, before, after) for job in later)

    aged = timedelta(seconds=models.DB_CLOCK_READ_EVERY_S)
    for key, (at, stamp) in list(models._db_clock_readings.items()):  # a minute passes
        models._db_clock_readings[key] = (at - aged.total_seconds(), stamp - aged)
    with counted_clock_reads(settings) as reads:
        new_jobs(settings)
    assert len(reads) == 1  # a minute on: read again


def test_a_slow_connection_checkout_does_not_stamp_jobs_ahead_of_the_database(
    settings: Settings,
) -> None:
    """The reading is timed around its query alone: a checkout that waits (a full pool, a
    reconnect after a failover) must not push the stamps carried forward into the future."""
    engine = get_engine(settings)
    engine.dispose()  # the next session connects anew

    def slow(*_args: Any) -> None:
        time.sleep(0.5)

    event.listen(engine.pool, "checkout", slow)
    try:
        (job,) = new_jobs(settings)
    finally:
        event.remove(engine.pool, "checkout", slow)
    after = db_clock(settings)
    assert job.created_at <= after + timedelta(milliseconds=20)


def test_a_stepped_host_clock_does_not_move_carried_forward_stamps(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    new_jobs(settings)  # the reading is taken with the host's clock right
    skew_clock(-SKEW)  # then NTP steps it back three hours
    before = db_clock(settings)
    (job,) = new_jobs(settings)
    assert between(job.created_at, before, db_clock(settings))


def test_queue_time_is_measured_on_one_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    skew_clock(SKEW)  # the API host is three hours fast
    (job,) = new_jobs(settings)
    skew_clock(timedelta(0))  # the worker's is right
    with session_scope(settings) as session:
        (claimed,) = job_service.claim_jobs(session=session, job_ids=[job.id], lease_seconds=60)
    queue = claimed.started_at - claimed.created_at
    assert timedelta(0) <= queue < timedelta(seconds=5)


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_the_registry_stamps_rollouts_on_the_database_clock(
    settings: Settings,
    model_file: Path,
    skew_clock: Callable[[timedelta], None],
    offset: timedelta,
) -> None:
    skew_clock(offset)
    before = db_clock(settings)
    add(settings, model_file, "v1", ModelStatus.PRODUCTION)
    canary(settings, model_file, "v2")
    canary(settings, model_file, "v3")  # supersedes v2: retired now
    with session_scope(settings) as session:
        rollout.promote(session=session, version="v3")  # archives v1
        rollout.rollback(session=session)  # v1 back, v3 rejected
    after = db_clock(settings)
    with session_scope(settings) as session:
        rows = {row.version: row for row in registry.list_versions(session=session)}
    assert rows["v1"].status == ModelStatus.PRODUCTION
    assert between(rows["v1"].promoted_at, before, after)  # restored by the rollback
    assert between(rows["v3"].promoted_at, before, after)
    assert rows["v2"].status == rows["v3"].status == ModelStatus.REJECTED
    assert between(rows["v2"].retired_at, before, after)
    assert between(rows["v3"].retired_at, before, after)


def test_a_canary_window_counts_the_jobs_of_a_fast_api_host_made_before_it_started(
    settings: Settings, model_file: Path, skew_clock: Callable[[timedelta], None]
) -> None:
    """A job created before the canary started is not the canary's, whatever the API host's
    clock said when it was created."""
    add(settings, model_file, "v1", ModelStatus.PRODUCTION)
    skew_clock(timedelta(minutes=10))  # the API host runs ten minutes fast
    (early,) = new_jobs(settings)
    skew_clock(timedelta(0))
    canary(settings, model_file, "v2", share=1.0)
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == early.id)
            .values(status=JobStatus.SUCCEEDED, model_version="v1", completed_at=models.utcnow())
        )
    with session_scope(settings) as session:
        row = session.get(ModelVersion, "v2")
        assert row is not None
        assert row.promoted_at is not None
        arms = rollout.arm_stats(
            session=session, since=row.promoted_at, canary="v2", production="v1", share=1.0
        )
    assert arms[0].jobs == 0
    assert arms[1].jobs == 0  # the early job is outside the window


def succeeded(settings: Settings, job: Job) -> None:
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(status=JobStatus.SUCCEEDED, completed_at=models.utcnow())
        )


def test_feedback_is_stamped_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    (job,) = new_jobs(settings)
    succeeded(settings, job)
    skew_clock(-SKEW)
    before = db_clock(settings)
    with session_scope(settings) as session:
        row = feedback_service.submit_feedback(
            session=session, job_id=job.id, client_id=None, rating="good"
        )
    assert between(row.created_at, before, db_clock(settings))


def keyed_job(session: Session, key: str) -> Job:
    image = photo()
    req = keyed(image, key)
    return job_service.create_job(
        session=session,
        image=image,
        idempotency_key=req.key,
        request_fingerprint=req.fingerprint,
    )


def test_the_idempotency_window_is_judged_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    """A key used a minute ago still replays on a host whose clock is a day fast (its own now
    against a created_at on the database's clock released the key)."""
    key = f"key-{uuid.uuid4()}"
    with session_scope(settings) as session:
        job = keyed_job(session, key)
    skew_clock(idempotency.KEY_WINDOW + timedelta(hours=1))
    with session_scope(settings) as session:
        found = idempotency.find_replay(session=session, client_id=None, req=keyed(photo(), key))
    assert found is not None
    assert found.id == job.id
