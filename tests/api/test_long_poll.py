"""`GET /v1/jobs/<id>?wait=S`: answered when the job ends (Redis notice or re-read) or after S."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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


@pytest.fixture(autouse=True)
def subscribed(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every long poll here holds a real subscription (this process's listener has subscribed
    first, so none falls back to polling the database however slow the machine), and the
    re-check without a notice comes every 30 s instead of every second: a poll of `wait=20`
    that answers in well under 10 s was answered by its notice, never by a re-check or the
    deadline. Tests of the re-check set their own."""
    monkeypatch.setattr(notify, "FALLBACK_RECHECK_S", 30.0)
    assert notify._listener(settings.effective_redis_url or "").subscribed.wait(10)


@pytest.fixture
def job_reads(monkeypatch: pytest.MonkeyPatch) -> threading.Semaphore:
    """Released after every read of jobs through `job_service.get_job` or `get_jobs` (a long
    poll's reads), so a job can be ended after the read its poll starts from, not on a timer
    that a slow machine may let fire before that read (the poll would answer at once)."""
    reads = threading.Semaphore(0)
    for name in ("get_job", "get_jobs"):
        read = getattr(job_service, name)

        def counted(*args: Any, _read: Callable[..., Any] = read, **kwargs: Any) -> Any:
            result = _read(*args, **kwargs)
            reads.release()
            return result

        monkeypatch.setattr(job_service, name, counted)
    return reads


def after_reads(
    reads: threading.Semaphore, action: Callable[[], object], count: int = 1
) -> threading.Thread:
    """Run `action` in a thread once jobs were read `count` times (see `job_reads`)."""

    def run() -> None:
        if all(reads.acquire(timeout=10) for _ in range(count)):
            action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def submit(client, auth) -> str:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    Image.new("RGB", (32, 24)).save(buf, format="PNG")
    data = {"image": (io.BytesIO(buf.getvalue()), "a.png")}
    resp = client.post("/v1/jobs", headers=auth, data=data, content_type="multipart/form-data")
    return str(resp.get_json()["id"])


def finish(settings: Settings, job_id: str, *, publish: bool) -> None:
    """Mark the job succeeded; with `publish`, send its notice (a bare id: re-read it)."""
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(status="succeeded"))
    if publish:
        notify.publish_finished(settings.effective_redis_url, [job_id])


def finish_after_read(
    settings: Settings, job_id: str, reads: threading.Semaphore, *, publish: bool
) -> threading.Thread:
    """`finish` the job once it was read: while the long poll that read it waits."""
    return after_reads(reads, lambda: finish(settings, job_id, publish=publish))


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


def test_long_poll_returns_on_the_notice(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, job_reads: threading.Semaphore
) -> None:
    job_id = submit(client, auth)
    thread = finish_after_read(settings, job_id, job_reads, publish=True)
    started = time.monotonic()
    body = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()
    thread.join()
    assert body["status"] == "succeeded"
    assert time.monotonic() - started < 10  # the notice, not the 30 s re-check or the deadline


def test_long_poll_rechecks_without_a_notice(  # type: ignore[no-untyped-def]
    client,
    auth,
    settings: Settings,
    job_reads: threading.Semaphore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(notify, "FALLBACK_RECHECK_S", 1.0)  # the real re-check
    job_id = submit(client, auth)
    thread = finish_after_read(settings, job_id, job_reads, publish=False)
    started = time.monotonic()
    body = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()
    thread.join()
    assert body["status"] == "succeeded"
    assert time.monotonic() - started < 10  # a re-check, not the read at the 20 s deadline


def test_wait_for_job_without_redis_polls_the_database(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, job_reads: threading.Semaphore
) -> None:
    job_id = submit(client, auth)
    thread = finish_after_read(settings, job_id, job_reads, publish=False)
    started = time.monotonic()
    session = get_sessionmaker(settings)()  # a request's session: no enclosing transaction block
    try:
        job = job_service.wait_for_job(
            session=session, job_id=job_id, client_id=None, seconds=20, redis_url=None
        )
        assert job.status == "succeeded"
    finally:
        session.close()
    thread.join()
    assert time.monotonic() - started < 5  # polled, not read at the 30 s re-check or the deadline


def test_long_polls_beyond_the_cap_answer_at_once(  # type: ignore[no-untyped-def]
    settings: Settings, auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import create_app

    slot, taken = notify.waiter_slot, threading.Event()

    @contextmanager
    def watched_slot(limit: int) -> Iterator[bool]:
        with slot(limit) as waiting:
            if waiting:
                taken.set()
            yield waiting

    monkeypatch.setattr(notify, "waiter_slot", watched_slot)
    capped = create_app(settings.model_copy(update={"long_poll_max_waiters": 1})).test_client()
    first_id, second_id = submit(capped, auth), submit(capped, auth)
    holder = threading.Thread(
        target=lambda: capped.get(f"/v1/jobs/{first_id}?wait=20", headers=auth)
    )
    holder.start()
    assert taken.wait(10)  # the first poll now holds the only slot, until its job ends
    started = time.monotonic()
    body = capped.get(f"/v1/jobs/{second_id}?wait=10", headers=auth).get_json()
    took = time.monotonic() - started
    finish(settings, first_id, publish=True)  # frees the holder
    holder.join()
    assert body["status"] == "queued"
    assert took < 5  # at once, not after its 10 s wait


def test_one_batch_notice_wakes_every_waiter(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, job_reads: threading.Semaphore
) -> None:
    """A worker publishes one message per batch; each waiting request wakes on its own id."""
    ids = [submit(client, auth), submit(client, auth)]
    bodies: dict[str, str] = {}

    def long_poll(job_id: str) -> None:
        bodies[job_id] = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()["status"]

    pollers = [threading.Thread(target=long_poll, args=(job_id,)) for job_id in ids]
    started = time.monotonic()
    for poller in pollers:
        poller.start()
    for _ in pollers:  # both polls have read their job and wait
        assert job_reads.acquire(timeout=10)
    with session_scope(settings) as session:
        session.execute(
            update(Job).where(Job.id.in_([uuid.UUID(i) for i in ids])).values(status="succeeded")
        )
    notify.publish_finished(settings.effective_redis_url, ids)
    for poller in pollers:
        poller.join()
    assert bodies == {ids[0]: "succeeded", ids[1]: "succeeded"}
    assert time.monotonic() - started < 10  # the notice, not the 30 s re-check or the deadline


def finish_next_job(
    settings: Settings, *, publish: bool = True, status: str = "succeeded", mask_png: bytes = b""
) -> threading.Thread:
    """Like a worker: wait for the next queued job, mark it succeeded (or `status`), storing
    `mask_png`, and send its notice."""

    def run() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with session_scope(settings) as session:
                job_id = session.scalar(select(Job.id).where(Job.status == "queued"))
                if job_id is not None:
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id)
                        .values(status=status, completed_at=utcnow(), mask_png=mask_png or None)
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


def submit_waiting(client, auth, wait: float, accept: str = "image/png"):  # type: ignore[no-untyped-def]
    """`POST /v1/jobs?wait=` of a small PNG, asking for `accept`."""
    return client.post(
        f"/v1/jobs?wait={wait:g}",
        headers={**auth, "Accept": accept},
        data=png_upload(),
        content_type="multipart/form-data",
    )


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


def test_submit_with_wait_and_accept_png_answers_the_mask_itself(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings
) -> None:
    """One round trip from photo to mask, as a synchronous predict endpoint answers: without it
    a client needs a second request for what it came for."""
    import numpy as np

    from segsvc.ml.preprocess import encode_mask_png

    mask = encode_mask_png(np.ones((24, 32), np.uint8))
    thread = finish_next_job(settings, mask_png=mask)
    resp = submit_waiting(client, auth, 20)
    thread.join()
    assert resp.status_code == 201
    assert resp.mimetype == "image/png"
    assert resp.data == mask
    job_id = resp.headers["X-Job-Id"]
    assert resp.headers["Location"].endswith(f"/v1/jobs/{job_id}")
    assert client.get(f"/v1/jobs/{job_id}/mask.png", headers=auth).data == mask
    # A job that did not succeed has no mask: its JSON says why.
    thread = finish_next_job(settings, status="failed")
    resp = submit_waiting(client, auth, 20, accept="image/png, application/json;q=0.5")
    thread.join()
    assert (resp.status_code, resp.get_json()["status"]) == (201, "failed")
    # Not done within the wait: the 202's JSON, whatever was asked for.
    resp = submit_waiting(client, auth, 0.2)
    assert (resp.status_code, resp.get_json()["status"]) == (202, "queued")


def test_a_finished_submit_whose_mask_cannot_be_read_answers_its_json_not_a_500(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is stored and finished: a 5xx would have the client submit the photo again."""
    from segsvc.blobs import DbBlobStore, FsBlobStore

    def unreachable(self: object, value: bytes) -> bytes:
        raise OSError(5, "Input/output error")  # a network filesystem away

    for store in (DbBlobStore, FsBlobStore):
        monkeypatch.setattr(store, "get", unreachable)
    thread = finish_next_job(settings, mask_png=b"\x89PNG not read")
    resp = submit_waiting(client, auth, 20)
    thread.join()
    assert resp.status_code == 201
    assert resp.get_json()["status"] == "succeeded"


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


def end_like_a_worker(
    settings: Settings, job_id: str, *, cancel: bool = False
) -> dict[str, notify.State]:
    """Claim the job, store its result and send the notice with its end state, as the worker's
    store does (a cancel asked while it runs ends it canceled at that boundary); returns the
    end state sent."""
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
    return states


@contextmanager
def reads_of_jobs() -> Iterator[list[str]]:
    """The statements this thread sends that read jobs, while the block runs: rows of the jobs
    table, not a count of them (a submit's admission check counts the backlog when its cached
    count is over a second old, as it is on a slow machine)."""
    me, seen = threading.get_ident(), []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sql = statement.lstrip()
        counts = sql.startswith("SELECT count(")
        reads = sql.startswith("SELECT") and "FROM jobs" in sql and not counts
        if reads and threading.get_ident() == me:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


@pytest.mark.parametrize("cancel", [False, True], ids=["succeeded", "canceled-while-running"])
def test_a_notice_with_the_end_state_answers_without_reading_the_job_again(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, job_reads: threading.Semaphore, cancel: bool
) -> None:
    job_id = submit(client, auth)
    ender = after_reads(job_reads, lambda: end_like_a_worker(settings, job_id, cancel=cancel))
    started = time.monotonic()
    with reads_of_jobs() as reads:
        body = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()
    ender.join()
    assert time.monotonic() - started < 10  # the notice, not the 30 s re-check or the deadline
    assert len(reads) == 1  # the read the wait starts from; the notice ended it
    assert body["status"] == ("canceled" if cancel else "succeeded")
    assert body == client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()  # as stored


def test_submit_with_wait_watches_the_job_from_before_it_is_enqueued(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker may end the job before the request gets past the enqueue: its notice still
    answers the wait (not the re-check), and the job is not read back from the database."""
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
    assert time.monotonic() - started < 10  # the notice, not the 30 s re-check or the deadline
    assert resp.status_code == 201
    assert reads == []
    body = resp.get_json()
    assert body["status"] == "succeeded"
    assert body == client.get(f"/v1/jobs/{body['id']}", headers=auth).get_json()


def test_a_batch_long_poll_ends_on_the_notices_end_states(  # type: ignore[no-untyped-def]
    client,
    auth,
    settings: Settings,
    job_reads: threading.Semaphore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The jobs end one by one after the poll's read, each with its own notice: the poll puts
    their end states together and answers without reading the jobs again."""
    ids = [submit(client, auth), submit(client, auth)]
    wait, woken = notify._Notice.wait, threading.Semaphore(0)

    def counted_wait(self: Any, seconds: float) -> dict[str, notify.State] | None:
        states = wait(self, seconds)
        woken.release()
        return states

    monkeypatch.setattr(notify._Notice, "wait", counted_wait)

    def end_one_by_one() -> None:
        end_like_a_worker(settings, ids[0])
        if woken.acquire(timeout=10):  # the poll took the first notice before the second comes
            end_like_a_worker(settings, ids[1])

    ender = after_reads(job_reads, end_one_by_one)
    with reads_of_jobs() as reads:
        body = client.get(f"/v1/jobs?ids={','.join(ids)}&wait=20", headers=auth).get_json()
    ender.join()
    assert [job["status"] for job in body["jobs"]] == ["succeeded", "succeeded"]
    assert len(reads) == 1  # the read the wait starts from; the notices ended both jobs
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
    client, auth, job_reads: threading.Semaphore, monkeypatch: pytest.MonkeyPatch
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
    assert job_reads.acquire(timeout=10)  # the poll has read the job and waits
    stopped_at = time.monotonic()
    notify.stop_waiting()
    poller.join(10)
    assert answered, "the waiting poll was not answered"
    assert answered[0][0] == "queued"
    assert answered[0][1] - stopped_at < 5  # now, not at its 20 s deadline
    started = time.monotonic()
    assert client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).get_json()["status"] == "queued"
    assert time.monotonic() - started < 5  # no wait, not 20 s


def test_a_stream_of_end_states_does_not_put_off_the_once_a_second_read(  # type: ignore[no-untyped-def]
    client,
    auth,
    settings: Settings,
    job_reads: threading.Semaphore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One job of a batch poll ends by a path that sends no notice (the reconciler); the others'
    notices keep coming less than a second apart: the poll still reads the jobs once a second
    and sees it, instead of waiting for a second of quiet (which never comes here: the poll
    would only see it at its 20 s deadline)."""
    monkeypatch.setattr(notify, "FALLBACK_RECHECK_S", 1.0)  # the real re-check
    silent, *noisy = [submit(client, auth) for _ in range(5)]
    quiet = threading.Event()

    def end_them_noisily() -> None:
        """After the poll's first read: end `silent` without a notice and the others like a
        worker, then send the others' end states again every 0.2 s until the poll answers."""
        finish(settings, silent, publish=False)
        states: dict[str, notify.State] = {}
        for job_id in noisy:
            states |= end_like_a_worker(settings, job_id)
        while not quiet.wait(0.2):
            notify.publish_finished(settings.effective_redis_url, noisy, states)

    ender = after_reads(job_reads, end_them_noisily)
    started = time.monotonic()
    body = client.get(f"/v1/jobs?ids={silent},{','.join(noisy)}&wait=20", headers=auth).get_json()
    took = time.monotonic() - started
    quiet.set()
    ender.join()
    assert [job["status"] for job in body["jobs"]] == ["succeeded"] * 5
    assert took < 10  # a re-check a second or so after the first read, not the 20 s deadline
