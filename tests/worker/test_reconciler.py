"""The reconciler on real Postgres and Redis: what it re-sends, ends, and leaves alone."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from PIL import Image
from prometheus_client import REGISTRY
from sqlalchemy import select, text, update

from segsvc import notify
from segsvc.db import get_sessionmaker, session_scope
from segsvc.images import validate_image
from segsvc.models import Job, utcnow
from segsvc.queue import make_celery
from segsvc.services import jobs as job_service
from segsvc.settings import Settings
from worker.reconciler import reconcile_periodically, run_reconcile, take_turn


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def make_job(settings: Settings, *, age_s: float = 60, **values: Any) -> uuid.UUID:
    """A stored job created `age_s` ago, with any column overridden."""
    image = validate_image(png(), max_bytes=10**6, max_pixels=10**6)
    with session_scope(settings) as session:
        job = job_service.create_job(session=session, image=image)
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(created_at=utcnow() - timedelta(seconds=age_s), **values)
        )
        return job.id


def get(settings: Settings, job_id: uuid.UUID) -> Job:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def queued_ids(settings: Settings) -> list[str]:
    client = redis.Redis.from_url(settings.broker_url or "")
    return [
        json.loads(m)["headers"]["argsrepr"].strip("[](),'")
        for m in client.lrange(settings.queue_name, 0, -1)
    ]


def result(job_id: uuid.UUID, lease_token: uuid.UUID) -> dict[str, Any]:
    """A worker's result for `job_id` under `lease_token`, as `complete_jobs` takes it."""
    return {
        "id": job_id,
        "lease_token": lease_token,
        "mask_png": b"x",
        "class_fractions": [1, 0, 0],
        "model_version": "v",
        "queue_ms": 1.0,
        "predict_ms": 1.0,
        "batch_size": 1,
    }


def inputs_kept(settings: Settings, job_id: uuid.UUID) -> tuple[bool, bool]:
    """Whether the job still holds (its upload, its derived model input)."""
    with session_scope(settings) as session:
        kept = session.execute(
            select(Job.input_bytes.is_not(None), Job.model_input.is_not(None)).where(
                Job.id == job_id
            )
        ).one()
        return bool(kept[0]), bool(kept[1])


def reconcile(settings: Settings) -> dict[str, object]:
    return run_reconcile(settings, make_celery(settings))


def test_reconcile_requeues_queued_job_missing_from_redis(settings: Settings) -> None:
    lost = make_job(settings)
    young = make_job(settings, age_s=0)
    report = reconcile(settings)
    assert report["requeued_missing"] == 1
    assert queued_ids(settings) == [str(lost)]
    assert get(settings, lost).enqueued_at is not None
    assert get(settings, young).enqueued_at is None
    again = reconcile(settings)  # now it is in Redis: nothing to do
    assert again["requeued_missing"] == 0
    assert queued_ids(settings) == [str(lost)]


def test_reconcile_treats_stale_unacked_message_as_lost(settings: Settings) -> None:
    held_by_dead = make_job(settings)
    held_by_live = make_job(settings)
    client = redis.Redis.from_url(settings.broker_url or "")
    for tag, job_id, delivered in (
        ("t1", held_by_dead, time.time() - 3600),
        ("t2", held_by_live, time.time()),
    ):
        raw = json.dumps({"headers": {"argsrepr": f"('{job_id}',)"}})
        client.hset("unacked", tag, json.dumps([raw, "", settings.queue_name]))
        client.zadd("unacked_index", {tag: delivered})
    report = reconcile(settings)
    assert report["requeued_missing"] == 1
    assert queued_ids(settings) == [str(held_by_dead)]


def test_reconcile_requeues_running_job_with_expired_lease(settings: Settings) -> None:
    expired = utcnow() - timedelta(seconds=5)
    dead = make_job(
        settings, status="running", attempts=1, lease_token=uuid.uuid4(), lease_expires_at=expired
    )
    alive = make_job(
        settings,
        status="running",
        attempts=1,
        lease_token=uuid.uuid4(),
        lease_expires_at=utcnow() + timedelta(seconds=60),
    )
    report = reconcile(settings)
    assert report["requeued_lost"] == 1
    job = get(settings, dead)
    assert (job.status, job.lease_token, job.attempts) == ("queued", None, 1)
    assert queued_ids(settings) == [str(dead)]
    assert get(settings, alive).status == "running"


def test_reconcile_fences_out_a_slow_worker(settings: Settings) -> None:
    token = uuid.uuid4()
    job_id = make_job(
        settings,
        status="running",
        attempts=1,
        lease_token=token,
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    reconcile(settings)
    with session_scope(settings) as session:
        stored = job_service.complete_jobs(session=session, results=[result(job_id, token)])
    assert stored == {}  # fenced out: nothing ended, nothing to announce
    assert get(settings, job_id).status == "queued"


@pytest.mark.parametrize(
    ("max_attempts", "code", "message"),
    [
        (1, "worker_lost", "The worker running this job stopped before it finished."),
        (2, "worker_lost", "The worker running this job stopped 2 times."),
        (3, "poison_input", "The worker stopped while running this job 3 times, the last"),
    ],
)
def test_reconcile_fails_job_lost_max_times(
    settings: Settings, max_attempts: int, code: str, message: str
) -> None:
    cfg = settings.model_copy(update={"job_max_attempts": max_attempts})
    job_id = make_job(
        cfg,
        status="running",
        attempts=max_attempts,
        lease_token=uuid.uuid4(),
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    report = reconcile(cfg)
    assert report["failed"] == 1
    job = get(cfg, job_id)
    assert (job.status, job.error_code) == ("failed", code)
    assert job.error_message.startswith(message)  # "1 times" with SEG_JOB_MAX_ATTEMPTS=1
    assert queued_ids(cfg) == []
    assert inputs_kept(cfg, job_id) == (True, False)  # the model input goes with the job


def test_reconcile_tells_long_polls_about_the_jobs_it_ended(settings: Settings) -> None:
    """A job the reconciler fails (lost too often) or cancels (canceled while queued after a
    release) gets a notice like a worker's, so its long polls answer now, not at a re-check."""
    url = settings.effective_redis_url
    pubsub = redis.Redis.from_url(url).pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(notify.channel(url))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    lost = make_job(
        settings,
        status="running",
        attempts=settings.job_max_attempts,
        lease_token=uuid.uuid4(),
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    canceled = make_job(settings, cancel_requested=True)
    report = reconcile(settings)
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert (report["failed"], report["canceled"]) == (1, 1)
    assert message is not None
    assert notify.parse_notice(message["data"]) == {str(lost): None, str(canceled): None}


def test_reconcile_sends_suspects_one_at_a_time(settings: Settings) -> None:
    expired = utcnow() - timedelta(seconds=1)
    suspects = [
        make_job(
            settings,
            age_s=60 - i,
            status="running",
            attempts=2,
            lease_token=uuid.uuid4(),
            lease_expires_at=expired,
        )
        for i in range(3)
    ]
    first_loss = make_job(
        settings, status="running", attempts=1, lease_token=uuid.uuid4(), lease_expires_at=expired
    )
    report = reconcile(settings)
    assert (report["requeued_lost"], report["waiting_suspects"]) == (2, 2)
    assert set(queued_ids(settings)) == {str(suspects[0]), str(first_loss)}
    assert reconcile(settings)["waiting_suspects"] == 2  # the first is still in flight
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == suspects[0]).values(status="succeeded"))
    assert reconcile(settings)["requeued_lost"] == 1


def test_reconcile_ends_canceled_jobs(settings: Settings) -> None:
    running = make_job(
        settings,
        status="running",
        attempts=1,
        cancel_requested=True,
        lease_token=uuid.uuid4(),
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    released = make_job(settings, cancel_requested=True)
    report = reconcile(settings)
    assert report["canceled"] == 2
    assert get(settings, running).status == "canceled"
    assert get(settings, released).status == "canceled"
    assert queued_ids(settings) == []
    assert inputs_kept(settings, running) == inputs_kept(settings, released) == (True, False)


def jobs_total(status: str) -> float:
    return REGISTRY.get_sample_value("segsvc_jobs_total", {"status": status}) or 0.0


def test_the_jobs_a_pass_ends_count_in_the_jobs_outcomes(settings: Settings) -> None:
    """`segsvc_jobs_total` counted only the jobs a worker stored: the dashboard's outcomes
    left out every job the reconciler failed (`worker_lost`, `poison_input`) or canceled."""
    cfg = settings.model_copy(update={"job_max_attempts": 3})
    expired = utcnow() - timedelta(seconds=1)
    before = {status: jobs_total(status) for status in ("succeeded", "failed", "canceled")}
    poison = make_job(
        cfg, status="running", attempts=3, lease_token=uuid.uuid4(), lease_expires_at=expired
    )
    canceled = make_job(
        cfg,
        status="running",
        attempts=1,
        cancel_requested=True,
        lease_token=uuid.uuid4(),
        lease_expires_at=expired,
    )
    make_job(cfg)  # only re-sent: no outcome
    report = reconcile(cfg)
    assert (report["failed"], report["canceled"], report["requeued_missing"]) == (1, 1, 1)
    assert get(cfg, poison).error_code == "poison_input"
    assert get(cfg, canceled).status == "canceled"
    after = {status: jobs_total(status) for status in before}
    assert {s: after[s] - before[s] for s in before} == {
        "succeeded": 0,
        "failed": 1,
        "canceled": 1,
    }
    reconcile(cfg)  # nothing more ended: nothing more counted
    assert {status: jobs_total(status) for status in before} == after


def test_a_pass_rolled_back_counts_no_outcomes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted once committed: with a broker that cannot be inspected the sends go before the
    commit, and one that fails rolls the pass back (the next pass ends the same jobs)."""
    from worker import reconciler

    def broker_away(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker away")

    monkeypatch.setattr(reconciler, "broker_inspectable", lambda cfg: False)
    monkeypatch.setattr(reconciler, "_send", broker_away)
    expired = utcnow() - timedelta(seconds=1)
    lost = make_job(
        settings,
        status="running",
        attempts=settings.job_max_attempts,
        lease_token=uuid.uuid4(),
        lease_expires_at=expired,
    )
    make_job(
        settings, status="running", attempts=1, lease_token=uuid.uuid4(), lease_expires_at=expired
    )
    before = jobs_total("failed")
    with pytest.raises(ConnectionError):
        reconcile(settings)
    assert get(settings, lost).status == "running"  # rolled back
    assert jobs_total("failed") == before


def test_a_pass_without_redis_still_ends_and_cancels_jobs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed Redis snapshot skipped the whole pass: jobs at their attempt limit and expired
    cancel requests waited for Redis to come back, though only Postgres is needed for them."""
    from worker import reconciler

    def down(cfg: Settings) -> set[str]:
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(reconciler, "broker_snapshot", down)
    canceled = make_job(settings, cancel_requested=True)
    report = reconcile(settings)
    assert report["canceled"] == 1
    assert get(settings, canceled).status == "canceled"


def test_reconcile_runs_one_at_a_time(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import reconciler

    monkeypatch.setattr(reconciler, "PASS_LOCK_WAIT_SECONDS", 0.2)  # then it gives up
    make_job(settings)
    holder = get_sessionmaker(settings)()
    try:
        holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": 0x5E657EC0})
        assert reconcile(settings) == {"skipped": True}
    finally:
        holder.rollback()
        holder.close()
    assert reconcile(settings)["requeued_missing"] == 1


def test_complete_job_canceled_while_running_ends_canceled(settings: Settings) -> None:
    job_id = make_job(settings)
    with session_scope(settings) as session:
        claimed = job_service.claim_jobs(session=session, job_ids=[job_id], lease_seconds=60)
    with session_scope(settings) as session:
        job_service.cancel_job(session=session, job_id=str(job_id), client_id=None)
    with session_scope(settings) as session:
        job_service.complete_jobs(session=session, results=[result(job_id, claimed[0].lease_token)])
    job = get(settings, job_id)
    assert (job.status, job.error_code) == ("canceled", "canceled")


def test_reconcile_failure_records_completed_webhook(settings: Settings) -> None:
    from segsvc.models import WebhookMessage

    cfg = settings.model_copy(update={"job_max_attempts": 2})
    job_id = make_job(
        cfg,
        status="running",
        attempts=2,
        lease_token=uuid.uuid4(),
        lease_expires_at=utcnow() - timedelta(seconds=1),
        webhook_url="https://hooks.example.com/x",
        webhook_events=["completed"],
    )
    reconcile(cfg)
    with session_scope(cfg) as session:
        events = [m.event_type for m in session.query(WebhookMessage).filter_by(job_id=job_id)]
    assert events == ["job.completed"]


def test_one_turn_per_interval_across_reconcilers(settings: Settings) -> None:
    cfg = settings.model_copy(update={"reconcile_interval_seconds": 2})
    assert take_turn(cfg)
    assert not take_turn(cfg)  # another worker (or beat) within the interval skips
    time.sleep(2)
    assert take_turn(cfg)


def test_without_redis_every_reconciler_takes_its_turn(settings: Settings) -> None:
    from tests.conftest import free_port

    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    assert take_turn(down)
    assert take_turn(down)


def test_the_worker_reconciles_on_its_own_without_beat(settings: Settings) -> None:
    """The loop each worker runs re-sends a lost job at start and again after Redis loses it,
    with no beat message (which would wait behind any backlog on the inference queue)."""
    cfg = settings.model_copy(update={"reconcile_interval_seconds": 0.3})
    lost = make_job(cfg)
    stop = threading.Event()
    thread = reconcile_periodically(cfg, make_celery(cfg), stop)
    try:
        deadline = time.monotonic() + 10
        while queued_ids(cfg) != [str(lost)]:
            assert time.monotonic() < deadline, "the first pass did not re-send the job"
            time.sleep(0.05)
        redis.Redis.from_url(cfg.broker_url or "").flushdb()  # Redis restarts empty
        while queued_ids(cfg) != [str(lost)]:
            assert time.monotonic() < deadline, "a later pass did not re-send the job"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_the_broker_snapshot_sees_every_id_of_a_large_batch_message(settings: Settings) -> None:
    """A batch submit of 64 images is one message; all its ids count as present, so the
    reconciler does not re-send the last ones on every pass while they wait."""
    from segsvc.queue import enqueue_jobs
    from segsvc.services.reconcile import broker_job_ids

    ids = [uuid.uuid4() for _ in range(64)]
    enqueue_jobs(make_celery(settings), ids, settings=settings)
    client = redis.Redis.from_url(settings.broker_url or "")
    found = broker_job_ids(client, queue=settings.queue_name, stale_after_s=60)
    assert {str(i) for i in ids} <= found


def claim(settings: Settings, job_id: uuid.UUID) -> job_service.Claimed:
    with session_scope(settings) as session:
        (claimed,) = job_service.claim_jobs(session=session, job_ids=[job_id], lease_seconds=60)
    return claimed


def release(settings: Settings, claimed: job_service.Claimed) -> bool:
    with session_scope(settings) as session:
        return job_service.release_job(
            session=session, job_id=claimed.id, lease_token=claimed.lease_token
        )


def expire_lease(settings: Settings, job_id: uuid.UUID) -> None:
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_a_claim_given_back_is_not_a_lost_run(settings: Settings) -> None:
    # Regression: a batch released twice (a canary's failing forward pass, a result write
    # failing once) left its jobs at attempts=2: taken for suspects, not taken over after their
    # lease, and failed as poison_input after a single real loss.
    job_id = make_job(settings)
    for _ in range(2):
        assert release(settings, claim(settings, job_id))
    claimed = claim(settings, job_id)
    assert claimed.attempts == 3
    expire_lease(settings, job_id)  # its worker dies: the first lost run
    taken_over = claim(settings, job_id)  # a stray redelivery may take it over at once
    assert taken_over.attempts == 4
    expire_lease(settings, job_id)  # lost again: now a suspect, re-sent, not failed
    report = reconcile(settings)
    assert (report["requeued_lost"], report["failed"]) == (1, 0)
    job = get(settings, job_id)
    assert (job.status, job.attempts, job.releases) == ("queued", 4, 2)


def test_a_job_given_back_again_and_again_ends_failed(settings: Settings) -> None:
    # Regression: a batch whose forward pass or result write failed every time was released and
    # claimed for ever, the jobs never ending.
    job_id = make_job(settings)
    for _ in range(job_service.MAX_RELEASES + 2):  # a short outage: fast releases fail nothing
        assert release(settings, claim(settings, job_id))
    with session_scope(settings) as session:
        first = utcnow() - timedelta(seconds=job_service.RELEASE_GIVE_UP_S + 1)
        session.execute(update(Job).where(Job.id == job_id).values(first_released_at=first))
    assert not release(settings, claim(settings, job_id))  # failing for 5 minutes: not passing
    job = get(settings, job_id)
    assert (job.status, job.error_code) == ("failed", "worker_error")
    with session_scope(settings) as session:
        assert job_service.claim_jobs(session=session, job_ids=[job_id], lease_seconds=60) == []


def test_a_lost_message_behind_a_backlog_longer_than_a_page_is_found(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the pass read only the oldest 5000 queued jobs, so with more than that still
    # in the broker, a younger job whose message was lost waited until the backlog drained.
    from segsvc.services import reconcile as service

    monkeypatch.setattr(service, "PAGE_SIZE", 2)
    in_broker = [make_job(settings, age_s=60 - i) for i in range(5)]
    lost = make_job(settings, age_s=30)
    sent: list[uuid.UUID] = []
    with session_scope(settings) as session:
        report = service.reconcile(
            session=session,
            settings=settings,
            present={str(i) for i in in_broker},
            enqueue=sent.append,
        )
    assert (report.requeued_missing, sent) == (1, [lost])
