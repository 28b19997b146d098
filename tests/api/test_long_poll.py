"""`GET /v1/jobs/<id>?wait=S`: answered when the job ends (Redis notice or re-read) or after S."""

from __future__ import annotations

import io
import threading
import time
import uuid

import pytest
from PIL import Image
from sqlalchemy import func, select, update

from segsvc import notify
from segsvc.db import get_sessionmaker, session_scope
from segsvc.models import Job, utcnow
from segsvc.services import jobs as job_service
from segsvc.settings import Settings


def submit(client, auth) -> str:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    Image.new("RGB", (32, 24)).save(buf, format="PNG")
    data = {"image": (io.BytesIO(buf.getvalue()), "a.png")}
    resp = client.post("/v1/jobs", headers=auth, data=data, content_type="multipart/form-data")
    return str(resp.get_json()["id"])


def finish_later(
    settings: Settings, job_id: str, delay: float, *, publish: bool
) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        with session_scope(settings) as session:
            session.execute(
                update(Job).where(Job.id == uuid.UUID(job_id)).values(status="succeeded")
            )
        if publish:
            notify.publish_finished(settings.effective_redis_url, [job_id])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("raw", ["abc", "-1", "31", "nan"])
def test_long_poll_rejects_bad_wait(client, auth, raw: str) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth)
    resp = client.get(f"/v1/jobs/{job_id}?wait={raw}", headers=auth)
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "validation_error"


def test_long_poll_times_out_with_current_state(client, auth) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth)
    started = time.monotonic()
    body = client.get(f"/v1/jobs/{job_id}?wait=0.4", headers=auth).get_json()
    assert body["status"] == "queued"
    assert 0.35 <= time.monotonic() - started < 3


def test_long_poll_returns_on_the_notice(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth)
    thread = finish_later(settings, job_id, 0.3, publish=True)
    started = time.monotonic()
    body = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()
    thread.join()
    assert body["status"] == "succeeded"
    assert time.monotonic() - started < 0.9  # the notice, not the 1 s re-check


def test_long_poll_rechecks_without_a_notice(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth)
    thread = finish_later(settings, job_id, 0.2, publish=False)
    body = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()
    thread.join()
    assert body["status"] == "succeeded"


def test_wait_for_job_without_redis_polls_the_database(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth)
    thread = finish_later(settings, job_id, 0.2, publish=False)
    started = time.monotonic()
    session = get_sessionmaker(settings)()  # a request's session: no enclosing transaction block
    try:
        job = job_service.wait_for_job(
            session=session, job_id=job_id, client_id=None, seconds=10, redis_url=None
        )
        assert job.status == "succeeded"
    finally:
        session.close()
    thread.join()
    assert time.monotonic() - started < 1.0


def test_long_polls_beyond_the_cap_answer_at_once(settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    capped = create_app(settings.model_copy(update={"long_poll_max_waiters": 1})).test_client()
    first_id, second_id = submit(capped, auth), submit(capped, auth)
    holder = threading.Thread(
        target=lambda: capped.get(f"/v1/jobs/{first_id}?wait=1.5", headers=auth)
    )
    holder.start()
    time.sleep(0.3)  # the first poll now holds the only slot
    started = time.monotonic()
    body = capped.get(f"/v1/jobs/{second_id}?wait=10", headers=auth).get_json()
    assert body["status"] == "queued"
    assert time.monotonic() - started < 0.5
    holder.join()


def test_one_batch_notice_wakes_every_waiter(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """A worker publishes one message per batch; each waiting request wakes on its own id."""
    ids = [submit(client, auth), submit(client, auth)]
    bodies: dict[str, str] = {}

    def long_poll(job_id: str) -> None:
        bodies[job_id] = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()["status"]

    pollers = [threading.Thread(target=long_poll, args=(job_id,)) for job_id in ids]
    started = time.monotonic()
    for poller in pollers:
        poller.start()
    time.sleep(0.3)
    with session_scope(settings) as session:
        session.execute(
            update(Job).where(Job.id.in_([uuid.UUID(i) for i in ids])).values(status="succeeded")
        )
    notify.publish_finished(settings.effective_redis_url, ids)
    for poller in pollers:
        poller.join()
    assert bodies == {ids[0]: "succeeded", ids[1]: "succeeded"}
    assert time.monotonic() - started < 0.9  # the notice, not the 1 s re-check


def finish_next_job(settings: Settings, *, publish: bool = True) -> threading.Thread:
    """Like a worker: wait for the next queued job, mark it succeeded and send its notice."""

    def run() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with session_scope(settings) as session:
                job_id = session.scalar(select(Job.id).where(Job.status == "queued"))
                if job_id is not None:
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id)
                        .values(status="succeeded", completed_at=utcnow())
                    )
            if job_id is not None:
                if publish:
                    notify.publish_finished(settings.effective_redis_url, [job_id])
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def png_upload() -> dict[str, tuple[io.BytesIO, str]]:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24)).save(buf, format="PNG")
    return {"image": (io.BytesIO(buf.getvalue()), "a.png")}


def test_submit_with_wait_returns_the_finished_job(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    thread = finish_next_job(settings)
    started = time.monotonic()
    resp = client.post(
        "/v1/jobs?wait=20", headers=auth, data=png_upload(), content_type="multipart/form-data"
    )
    thread.join()
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["status"] == "succeeded"
    assert body["completed_at"]
    assert resp.headers["Location"].endswith(f"/v1/jobs/{body['id']}")
    assert time.monotonic() - started < 5


def test_submit_with_wait_answers_202_when_the_job_is_not_done(client, auth) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    resp = client.post(
        "/v1/jobs?wait=0.3", headers=auth, data=png_upload(), content_type="multipart/form-data"
    )
    assert resp.status_code == 202
    assert resp.get_json()["status"] == "queued"
    assert 0.25 <= time.monotonic() - started < 3


def test_submit_with_a_bad_wait_stores_nothing(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/v1/jobs?wait=31", headers=auth, data=png_upload(), content_type="multipart/form-data"
    )
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "validation_error"
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
