"""End to end with a real Celery worker process on real Postgres and Redis."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image, ImageOps

from tests.conftest import sample_images

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def submit(client, auth, photo: Path) -> str:  # type: ignore[no-untyped-def]
    """POST one photo as `/v1/jobs` takes it; the accepted (202) job's id."""
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(photo.read_bytes()), photo.name)},
    )
    assert resp.status_code == 202, resp.get_json()
    return str(resp.get_json()["id"])


def wait_for(client, auth, job_id: str, timeout: float = 90.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # long polls: answered by the worker's notice
        body = client.get(f"/v1/jobs/{job_id}?wait=10", headers=auth).get_json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
    raise AssertionError(f"job {job_id} did not finish: {body}")


def test_pet_photo_gets_a_mask_of_its_size(client, auth, worker: Path) -> None:  # type: ignore[no-untyped-def]
    photos = sample_images(3)
    ids = [submit(client, auth, photo) for photo in photos]
    for photo, job_id in zip(photos, ids, strict=True):
        body = wait_for(client, auth, job_id)
        assert body["status"] == "succeeded", (body, worker.read_text()[-2000:])
        assert body["model_version"] == "test-v1"
        assert body["metrics"]["predict_ms"] > 0
        assert body["attempts"] == 1
        mask = client.get(f"/v1/jobs/{job_id}/mask.png", headers=auth)
        with Image.open(photo) as src, Image.open(io.BytesIO(mask.data)) as img:
            assert img.size == ImageOps.exif_transpose(src).size
            assert img.mode == "L"
            assert set(np.unique(np.asarray(img))) <= {0, 1, 2}


def test_finished_job_is_not_run_twice(client, auth, worker: Path, settings) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from segsvc.queue import enqueue_job, make_celery

    photo = sample_images(1)[0]
    job_id = submit(client, auth, photo)
    first = wait_for(client, auth, job_id)
    enqueue_job(make_celery(settings), uuid.UUID(job_id), settings=settings)  # duplicate
    broker = redis.Redis.from_url(settings.broker_url or "")
    deadline = time.monotonic() + 30
    while broker.llen(settings.queue_name) or broker.hlen("unacked"):  # taken and settled
        assert time.monotonic() < deadline, "the duplicate was never consumed"
        time.sleep(0.05)
    again = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    assert again["attempts"] == 1
    assert again["completed_at"] == first["completed_at"]


def test_bad_stored_image_fails_job_without_retry(client, auth, worker: Path, settings) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from segsvc.db import session_scope
    from segsvc.models import Job
    from segsvc.queue import enqueue_job, make_celery

    photo = sample_images(1)[0]
    job_id = submit(client, auth, photo)
    # Wait for it, then replay a corrupted copy as a new job row.
    wait_for(client, auth, job_id)
    with session_scope(settings) as session:
        src = session.get(Job, uuid.UUID(job_id))
        assert src is not None
        bad = Job(
            client_id=src.client_id,
            input_sha256="0" * 64,
            input_content_type="image/jpeg",
            input_width=10,
            input_height=10,
            input_bytes=b"\xff\xd8broken",
            model_input=b"short",
        )
        session.add(bad)
        session.flush()
        bad_id = bad.id
    enqueue_job(make_celery(settings), bad_id, settings=settings)
    body = wait_for(client, auth, str(bad_id))
    assert body["status"] == "failed"
    assert body["error"]["code"] == "poison_input"
    assert body["attempts"] == 1


def test_long_poll_is_woken_by_the_worker(client, auth, worker: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Answered on the worker's notice: with the API's own re-read of the job put off to 30 s,
    # only the notice can answer before then (the wait is 25 s).
    from segsvc import notify

    monkeypatch.setattr(notify, "FALLBACK_RECHECK_S", 30.0)
    monkeypatch.setattr(notify, "POLL_WITHOUT_REDIS_S", 30.0)  # unsubscribed, it would poll
    late = []
    for photo in sample_images(2):
        job_id = submit(client, auth, photo)
        body = client.get(f"/v1/jobs/{job_id}?wait=25", headers=auth).get_json()
        answered = datetime.now(UTC)
        assert body["status"] == "succeeded"
        late.append((answered - datetime.fromisoformat(body["completed_at"])).total_seconds())
    assert max(late) < 10, late


def test_batch_submit_and_one_long_poll_for_all(client, auth, worker: Path) -> None:  # type: ignore[no-untyped-def]
    photos = sample_images(3)
    resp = client.post(
        "/v1/jobs/batch",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": [(io.BytesIO(p.read_bytes()), p.name) for p in photos]},
    )
    assert resp.status_code == 202
    ids = [j["id"] for j in resp.get_json()["jobs"]]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        jobs = client.get(f"/v1/jobs?ids={','.join(ids)}&wait=10", headers=auth).get_json()["jobs"]
        if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs):
            break
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, worker.read_text()[-2000:]
    for photo, job in zip(photos, jobs, strict=True):
        with Image.open(photo) as src:
            w, h = ImageOps.exif_transpose(src).size
        assert (job["input"]["width"], job["input"]["height"]) == (w, h)


def test_malformed_messages_are_dropped_and_the_worker_keeps_serving(  # type: ignore[no-untyped-def]
    client, auth, settings, production_model: str, tmp_path: Path
) -> None:
    """A run_job message whose body is null, or whose arguments are a number, is logged,
    acknowledged and dropped. An error out of the consumer's strategy stopped the worker, and
    the message, restored to the queue, then stopped every worker that took it."""
    import uuid

    from segsvc.queue import RUN_JOB, make_celery
    from tests.conftest import start_worker, stop_process

    log_path = tmp_path / "worker.log"
    proc = start_worker(settings, log_path)
    try:
        with make_celery(settings).producer_or_acquire() as producer:
            for body in (None, [5, {}, {}], {"args": 5}):
                producer.publish(
                    body,
                    routing_key=settings.queue_name,
                    headers={"task": RUN_JOB, "id": str(uuid.uuid4())},
                    serializer="json",
                )
        job_id = submit(client, auth, sample_images(1)[0])
        body = wait_for(client, auth, job_id)
        assert body["status"] == "succeeded", log_path.read_text()[-3000:]
        broker = redis.Redis.from_url(settings.broker_url or "")
        deadline = time.monotonic() + 30
        while broker.llen(settings.queue_name) or broker.hlen("unacked"):  # all settled
            assert time.monotonic() < deadline, "a malformed message was never settled"
            time.sleep(0.05)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert log_path.read_text().count("dropping a segsvc.run_job message") == 3
    finally:
        stop_process(proc)


def test_prefetch_counts_the_jobs_a_message_carries(  # type: ignore[no-untyped-def]
    client, auth, settings, production_model: str, tmp_path: Path
) -> None:
    """A batch submit's one message carries all its jobs, and a worker's prefetch (3 x the
    batch size) counted messages: one worker held 96 messages of up to 16 jobs each while
    workers added to share the backlog found the queue empty. Prefetch now counts jobs: with
    the worker's claims held up (the test locks every job row), a worker of batch size 2
    (prefetch 6) takes 2 messages of 4 jobs, not 6, and leaves the rest in the queue."""
    from sqlalchemy import select

    from segsvc.db import session_scope
    from segsvc.models import Job
    from tests.conftest import encode_image, start_worker, stop_process

    png = encode_image(Image.new("RGB", (40, 30), (10, 200, 30)))
    ids: list[str] = []
    for _ in range(8):
        resp = client.post(
            "/v1/jobs/batch",
            headers=auth,
            content_type="multipart/form-data",
            data={"image": [(io.BytesIO(png), f"{i}.png") for i in range(4)]},
        )
        assert resp.status_code == 202, resp.get_json()
        ids += [j["id"] for j in resp.get_json()["jobs"]]
    broker = redis.Redis.from_url(settings.broker_url or "")
    assert broker.llen(settings.queue_name) == 8

    log_path = tmp_path / "worker.log"
    held: list[int] = []
    with session_scope(settings) as session:
        session.execute(select(Job.id).where(Job.id.in_(ids)).with_for_update()).all()
        proc = start_worker(settings, log_path, SEG_BATCH_MAX_SIZE="2")
        try:
            deadline = time.monotonic() + 4  # the consumer fetches within ms of each ack
            while time.monotonic() < deadline:
                held.append(int(broker.hlen("unacked")))
                time.sleep(0.05)
        finally:
            session.rollback()  # lets the claims through
    try:
        jobs: list[dict] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = client.get(f"/v1/jobs?ids={','.join(ids)}&wait=10", headers=auth).get_json()[
                "jobs"
            ]
            if all(j["status"] == "succeeded" for j in jobs):
                break
        assert [j["status"] for j in jobs] == ["succeeded"] * len(ids), log_path.read_text()[-3000:]
    finally:
        stop_process(proc)
    assert max(held) == 2, held  # 2 x 4 jobs: the first took 4 of 6 slots, the next the rest
