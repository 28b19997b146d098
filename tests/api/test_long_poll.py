"""`GET /v1/jobs/<id>?wait=S`: answered when the job ends (Redis notice or re-read) or after S."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.exc import OperationalError

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
    from prometheus_client import REGISTRY

    accepted = REGISTRY.get_sample_value("segsvc_submissions_total") or 0.0
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
    # Accepted (and already done): one submission, like a 202.
    assert REGISTRY.get_sample_value("segsvc_submissions_total") == accepted + 1


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


def end_like_a_worker(settings: Settings, job_id: str, *, cancel: bool = False) -> None:
    """Claim the job, store its result and send the notice with its end state, as the worker's
    store does (a cancel asked while it runs ends it canceled at that boundary)."""
    jid = uuid.UUID(job_id)
    with session_scope(settings) as session:
        (claimed,) = job_service.claim_jobs(session=session, job_ids=[jid], lease_seconds=60)
    if cancel:
        with session_scope(settings) as session:
            job_service.cancel_job(session=session, job_id=job_id, client_id=None)
    result = {
        "id": jid,
        "lease_token": claimed.lease_token,
        "mask_png": b"png",
        "class_fractions": [0.1234567890123, 0.7, 0.1765432109877],
        "model_version": "v7",
        "queue_ms": 12.345678901234,
        "predict_ms": 3.3333333333333335,
        "batch_size": 5,
    }
    with session_scope(settings) as session:
        states = job_service.complete_jobs(session=session, results=[result])
    notify.publish_finished(settings.effective_redis_url, [jid], states)


@contextmanager
def reads_of_jobs() -> Iterator[list[str]]:
    """The statements this thread sends that read the jobs table, while the block runs."""
    me, seen = threading.get_ident(), []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        reads = statement.lstrip().startswith("SELECT") and "FROM jobs" in statement
        if reads and threading.get_ident() == me:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


@pytest.mark.parametrize("cancel", [False, True], ids=["succeeded", "canceled-while-running"])
def test_a_notice_with_the_end_state_answers_without_reading_the_job_again(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, cancel: bool
) -> None:
    job_id = submit(client, auth)
    ender = threading.Timer(0.3, end_like_a_worker, (settings, job_id), {"cancel": cancel})
    ender.start()
    started = time.monotonic()
    with reads_of_jobs() as reads:
        body = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()
    ender.join()
    assert time.monotonic() - started < 0.9  # the notice, not the 1 s re-check
    assert len(reads) == 1  # the read the wait starts from; the notice ended it
    assert body["status"] == ("canceled" if cancel else "succeeded")
    assert body == client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()  # as stored


def test_submit_with_wait_watches_the_job_from_before_it_is_enqueued(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker may end the job before the request gets past the enqueue: its notice still
    answers the wait (no 1 s re-check), and the job is not read back from the database."""
    from api.routes import jobs as routes

    enqueue = routes.enqueue_jobs

    def enqueue_and_end_at_once(app: Any, job_ids: list[uuid.UUID], **kwargs: Any) -> None:
        enqueue(app, job_ids, **kwargs)
        for job_id in job_ids:
            end_like_a_worker(settings, str(job_id))

    monkeypatch.setattr(routes, "enqueue_jobs", enqueue_and_end_at_once)
    started = time.monotonic()
    with reads_of_jobs() as reads:
        resp = client.post(
            "/v1/jobs?wait=20", headers=auth, data=png_upload(), content_type="multipart/form-data"
        )
    assert time.monotonic() - started < 0.9
    assert resp.status_code == 201
    assert reads == []
    body = resp.get_json()
    assert body["status"] == "succeeded"
    assert body == client.get(f"/v1/jobs/{body['id']}", headers=auth).get_json()


def test_a_batch_long_poll_ends_on_the_notices_end_states(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    ids = [submit(client, auth), submit(client, auth)]
    enders = [
        threading.Timer(0.2 * n, end_like_a_worker, (settings, i)) for n, i in enumerate(ids, 1)
    ]
    for ender in enders:
        ender.start()
    with reads_of_jobs() as reads:
        body = client.get(f"/v1/jobs?ids={','.join(ids)}&wait=20", headers=auth).get_json()
    for ender in enders:
        ender.join()
    assert [job["status"] for job in body["jobs"]] == ["succeeded", "succeeded"]
    assert len(reads) == 1
    assert body == client.get(f"/v1/jobs?ids={','.join(ids)}", headers=auth).get_json()


def test_a_submit_whose_wait_cannot_read_the_job_answers_202(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is stored and enqueued when the wait's re-read fails (a database failover): a
    503 would have the client submit it again, so the answer is the 202 to poll it by."""

    def lost_connection(**_: Any) -> Job:
        raise OperationalError("SELECT jobs", {}, Exception("server closed the connection"))

    monkeypatch.setattr(job_service, "get_job", lost_connection)
    resp = client.post(
        "/v1/jobs?wait=1.5", headers=auth, data=png_upload(), content_type="multipart/form-data"
    )
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["status"] == "queued"
    with session_scope(settings) as session:
        assert session.get(Job, uuid.UUID(body["id"])) is not None


def test_stop_waiting_answers_every_long_poll_now(  # type: ignore[no-untyped-def]
    client, auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the API's SIGTERM handler calls: waiting polls answer as the job stands, and new
    ones do not wait."""
    monkeypatch.setattr(notify, "_stopping", threading.Event())  # this process goes on after
    job_id = submit(client, auth)
    answered: list[tuple[str, float]] = []

    def long_poll() -> None:
        body = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()
        answered.append((body["status"], time.monotonic()))

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.3)
    stopped_at = time.monotonic()
    notify.stop_waiting()
    poller.join(5)
    assert answered
    assert answered[0][0] == "queued"
    assert answered[0][1] - stopped_at < 0.5
    started = time.monotonic()
    assert client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()["status"] == "queued"
    assert time.monotonic() - started < 0.5


def test_a_stream_of_end_states_does_not_put_off_the_once_a_second_read(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings
) -> None:
    """One job of a batch poll ends by a path that sends no notice (the reconciler); the others'
    notices keep coming less than a second apart: the poll still reads the jobs once a second
    and sees it, instead of waiting for a second of quiet."""
    silent, *noisy = [submit(client, auth) for _ in range(5)]
    timers = [finish_later(settings, silent, 0.1, publish=False)]
    timers += [
        threading.Timer(0.4 * n, end_like_a_worker, (settings, job_id))
        for n, job_id in enumerate(noisy, 1)
    ]
    for timer in timers[1:]:
        timer.start()
    started = time.monotonic()
    body = client.get(f"/v1/jobs?ids={silent},{','.join(noisy)}&wait=20", headers=auth).get_json()
    took = time.monotonic() - started
    for timer in timers:
        timer.join()
    assert [job["status"] for job in body["jobs"]] == ["succeeded"] * 5
    assert took < 2.3  # the last notice comes at 1.6 s; a second of quiet after it: 2.6 s
