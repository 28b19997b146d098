"""`POST /v1/jobs/batch` (all images accepted or none) and `GET /v1/jobs?ids=` (one read, or one
long poll, for many jobs)."""

from __future__ import annotations

import io
import json
import threading
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from flask import Request
from packaging.requirements import Requirement
from PIL import Image
from sqlalchemy import func, select

from segsvc import notify
from segsvc.db import session_scope
from segsvc.ml.preprocess import encode_mask_png
from segsvc.models import Job
from segsvc.settings import Settings
from tests.api.test_jobs import mark_succeeded, png_bytes
from tests.conftest import encode_image


def submit_batch(client, auth, images: list[bytes], headers=None, **fields):  # type: ignore[no-untyped-def]
    data: dict[str, object] = {
        "image": [(io.BytesIO(b), f"pet{i}.png") for i, b in enumerate(images)],
        **fields,
    }
    return client.post(
        "/v1/jobs/batch",
        headers={**auth, **(headers or {})},
        data=data,
        content_type="multipart/form-data",
    )


def job_count(settings: Settings) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def queued_messages(settings: Settings) -> list[dict[str, object]]:
    raw = redis.Redis.from_url(settings.broker_url or "").lrange(settings.queue_name, 0, -1)
    return [json.loads(m) for m in raw]


def test_batch_stores_every_image_in_order_and_sends_one_message(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings
) -> None:
    sizes = [(64, 48), (32, 40), (50, 50)]
    resp = submit_batch(client, auth, [png_bytes(s) for s in sizes])
    assert resp.status_code == 202
    jobs = resp.get_json()["jobs"]
    assert [j["status"] for j in jobs] == ["queued"] * 3
    with session_scope(settings) as session:
        stored = [session.get(Job, uuid.UUID(j["id"])) for j in jobs]
        assert [(j.input_width, j.input_height) for j in stored if j] == sizes
        assert all(j is not None and len(j.model_input or b"") == 128 * 128 * 3 for j in stored)
    messages = queued_messages(settings)
    assert len(messages) == 1
    body = messages[0]
    args = json.loads(__import__("base64").b64decode(body["body"]))[0]
    assert args == [j["id"] for j in jobs]


def test_batch_with_a_corrupt_image_stores_nothing(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    good = png_bytes()
    resp = submit_batch(client, auth, [good, good[: len(good) // 2], good])
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["error"] == "invalid_image"
    assert body["message"].startswith("Image 1 (pet1.png): ")
    assert job_count(settings) == 0
    assert queued_messages(settings) == []


def test_batch_keeps_the_status_of_the_first_bad_image(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    resp = submit_batch(client, auth, [png_bytes(), b"GIF89a not allowed"])
    assert resp.status_code == 415
    assert resp.get_json()["message"].startswith("Image 1 ")
    assert job_count(settings) == 0


def test_batch_limits_the_image_count(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    resp = submit_batch(client, auth, [png_bytes()] * (settings.batch_submit_max_images + 1))
    assert resp.status_code == 422
    assert str(settings.batch_submit_max_images) in resp.get_json()["message"]
    assert job_count(settings) == 0
    assert submit_batch(client, auth, []).status_code == 400


def test_batch_body_limit_is_its_own(client, auth, settings: Settings, app) -> None:  # type: ignore[no-untyped-def]
    """A batch may be larger than one upload, but not larger than its own limit."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    one = buf.getvalue()  # ~270 KB: four of them outgrow the batch limit's multipart slack
    app.config["SEG_SETTINGS"] = settings.model_copy(
        update={
            "max_upload_bytes": len(one) + 10,
            "batch_submit_max_bytes": 3 * len(one) + 2048,
        }
    )
    app.config["MAX_CONTENT_LENGTH"] = len(one) + 1024
    assert submit_batch(client, auth, [one] * 3).status_code == 202
    resp = submit_batch(client, auth, [one] * 4)
    assert resp.status_code == 413
    assert resp.get_json()["error"] == "payload_too_large"


def test_batch_takes_one_rate_token_per_image(client, auth, settings: Settings, app) -> None:  # type: ignore[no-untyped-def]
    app.config["SEG_SETTINGS"] = settings.model_copy(
        update={"rate_limit_per_minute": 1, "rate_limit_burst": 4}
    )
    assert submit_batch(client, auth, [png_bytes()] * 3).status_code == 202
    resp = submit_batch(client, auth, [png_bytes()] * 2)  # one token left
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) >= 1
    too_big = submit_batch(client, auth, [png_bytes()] * 5)  # can never pass: say so
    assert too_big.status_code == 422
    assert job_count(settings) == 3


def test_batch_admission_counts_every_image(client, auth, settings: Settings, app) -> None:  # type: ignore[no-untyped-def]
    app.config["SEG_SETTINGS"] = settings.model_copy(update={"max_queue_depth": 4})
    assert submit_batch(client, auth, [png_bytes()] * 3).status_code == 202
    resp = submit_batch(client, auth, [png_bytes()] * 2)
    assert resp.status_code == 503
    assert resp.get_json()["error"] == "queue_full"
    assert job_count(settings) == 3


def test_batch_idempotency_replays_the_same_jobs(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    images = [png_bytes((64, 48)), png_bytes((30, 30))]
    key = {"Idempotency-Key": "nightly-42"}
    first = submit_batch(client, auth, images, headers=key)
    assert first.status_code == 202
    again = submit_batch(client, auth, images, headers=key)
    assert again.status_code == 200
    first_ids = [j["id"] for j in first.get_json()["jobs"]]
    assert [j["id"] for j in again.get_json()["jobs"]] == first_ids
    reordered = submit_batch(client, auth, images[::-1], headers=key)
    assert reordered.status_code == 422
    fewer = submit_batch(client, auth, images[:1], headers=key)
    assert fewer.status_code == 422
    assert job_count(settings) == 2
    # a single submit's key lives apart from a batch's
    single = client.post(
        "/v1/jobs",
        headers={**auth, **key},
        data={"image": (io.BytesIO(images[0]), "a.png")},
        content_type="multipart/form-data",
    )
    assert single.status_code == 202


def test_an_expired_larger_batch_under_the_key_is_released_whole(
    client, auth, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    """A key's 5-image batch expired, then a 3-image batch reused the key: the old batch's keys
    3 and 4 stayed, so a later request under the key met 3 fresh and 2 stale jobs and judged
    them all by whichever came first (a 422, or the fresh batch's keys released)."""
    from datetime import timedelta

    from sqlalchemy import update

    from segsvc.models import utcnow

    key = {"Idempotency-Key": "weekly"}
    five = [png_bytes((20 + i, 20)) for i in range(5)]
    assert submit_batch(client, auth, five, headers=key).status_code == 202
    with session_scope(settings) as session:
        session.execute(update(Job).values(created_at=utcnow() - timedelta(hours=25)))
    three = [png_bytes((40 + i, 20)) for i in range(3)]
    fresh = submit_batch(client, auth, three, headers=key)
    assert fresh.status_code == 202
    with session_scope(settings) as session:
        keyed = session.scalar(select(func.count()).where(Job.idempotency_key.is_not(None)))
    assert keyed == 3  # the old batch's five keys are all released
    again = submit_batch(client, auth, three, headers=key)
    assert again.status_code == 200
    assert [j["id"] for j in again.get_json()["jobs"]] == [
        j["id"] for j in fresh.get_json()["jobs"]
    ]
    assert submit_batch(client, auth, five, headers=key).status_code == 422  # the key is taken
    assert job_count(settings) == 8


def test_batch_webhook_applies_to_every_job(open_client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    resp = submit_batch(
        open_client,
        auth,
        [png_bytes()] * 2,
        webhook="http://127.0.0.1:9/hook",
        webhook_events="completed",
    )
    assert resp.status_code == 202, resp.get_json()
    with session_scope(settings) as session:
        for j in resp.get_json()["jobs"]:
            job = session.get(Job, uuid.UUID(j["id"]))
            assert job is not None
            assert job.webhook_url == "http://127.0.0.1:9/hook"
            assert job.webhook_events == ["completed"]


def test_batch_refuses_a_bad_webhook_before_storing(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    resp = submit_batch(client, auth, [png_bytes()] * 2, webhook="http://127.0.0.1:9/hook")
    assert resp.status_code == 422  # loopback is not a webhook target outside tests
    assert job_count(settings) == 0


def test_batch_refuses_two_webhooks_before_storing(open_client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    hooks = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    resp = submit_batch(open_client, auth, [png_bytes()] * 2, webhook=hooks)
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "validation_error"
    assert "'webhook'" in resp.get_json()["message"]
    assert job_count(settings) == 0


def test_read_jobs_in_the_order_asked(client, auth, settings: Settings, admin_key: str) -> None:  # type: ignore[no-untyped-def]
    ids = [j["id"] for j in submit_batch(client, auth, [png_bytes()] * 3).get_json()["jobs"]]
    other = submit_batch(client, {"Authorization": f"Bearer {admin_key}"}, [png_bytes()])
    hidden = other.get_json()["jobs"][0]["id"]
    missing = str(uuid.uuid4())
    asked = [ids[2], ids[0], hidden, missing, ids[1], ids[0]]
    resp = client.get(f"/v1/jobs?ids={','.join(asked)}", headers=auth)
    assert resp.status_code == 200
    body = resp.get_json()
    assert [j["id"] for j in body["jobs"]] == [ids[2], ids[0], ids[1]]
    assert body["not_found"] == [hidden, missing]
    assert body["jobs"][0]["urls"]["self"].endswith(f"/v1/jobs/{ids[2]}")


def test_read_jobs_counts_an_id_asked_again_once(client, auth) -> None:  # type: ignore[no-untyped-def]
    """The limit of 100 counts jobs: one id sent 101 times (a client's list with repeats) is
    one job asked for, as the answer lists it once."""
    (job,) = submit_batch(client, auth, [png_bytes()]).get_json()["jobs"]
    resp = client.get(f"/v1/jobs?ids={','.join([job['id']] * 101)}", headers=auth)
    assert resp.status_code == 200, resp.get_json()
    assert [j["id"] for j in resp.get_json()["jobs"]] == [job["id"]]


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?ids=",
        "?ids=nope",
        f"?ids={','.join(str(uuid.UUID(int=i)) for i in range(101))}",
        "?ids=00000000-0000-4000-8000-000000000000&wait=31",
    ],
)
def test_read_jobs_rejects_bad_queries(client, auth, query: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(f"/v1/jobs{query}", headers=auth)
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "validation_error"


def test_read_jobs_long_poll_waits_for_every_job(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No re-check within the test: only the second notice can answer the poll in time.
    monkeypatch.setattr(notify, "FALLBACK_RECHECK_S", 30.0)
    ids = [j["id"] for j in submit_batch(client, auth, [png_bytes()] * 2).get_json()["jobs"]]
    mask = encode_mask_png(np.ones((48, 64), np.uint8))
    redis_url = settings.effective_redis_url

    def finish() -> None:
        for job_id in ids:  # one at a time: the poll must not answer after the first
            time.sleep(0.3)
            mark_succeeded(settings, job_id, mask)
            notify.publish_finished(redis_url, [job_id])

    finisher = threading.Thread(target=finish)
    started = time.monotonic()
    finisher.start()
    resp = client.get(f"/v1/jobs?ids={','.join(ids)}&wait=10", headers=auth)
    waited = time.monotonic() - started
    finisher.join()
    assert [j["status"] for j in resp.get_json()["jobs"]] == ["succeeded", "succeeded"]
    assert 0.55 < waited < 3.0  # woken by the second notice (the re-check is 30 s, the wait 10)


def test_read_jobs_long_poll_answers_after_the_wait(client, auth) -> None:  # type: ignore[no-untyped-def]
    ids = [j["id"] for j in submit_batch(client, auth, [png_bytes()]).get_json()["jobs"]]
    started = time.monotonic()
    resp = client.get(f"/v1/jobs?ids={ids[0]}&wait=0.5", headers=auth)
    assert 0.45 < time.monotonic() - started < 2.0
    assert resp.get_json()["jobs"][0]["status"] == "queued"


def test_batches_beyond_two_at_once_wait_their_turn(client, auth) -> None:  # type: ignore[no-untyped-def]
    from api.routes import jobs as routes

    answers: list[int] = []
    routes.BATCHES_AT_ONCE.acquire()
    routes.BATCHES_AT_ONCE.acquire()  # both slots busy, as with two large batches in flight
    try:
        sender = threading.Thread(
            target=lambda: answers.append(submit_batch(client, auth, [png_bytes()]).status_code)
        )
        sender.start()
        sender.join(0.5)
        assert answers == []  # paid for, waiting for a slot: nothing decoded or stored
    finally:
        routes.BATCHES_AT_ONCE.release()
    sender.join(10)
    routes.BATCHES_AT_ONCE.release()
    assert answers == [202]


def test_a_batch_that_waits_too_long_for_its_turn_is_told_to_retry(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slow uploads hold both turns: later batch submits give their thread back with a 503
    and Retry-After instead of piling up behind them, and store nothing."""
    from api.routes import jobs as routes

    monkeypatch.setattr(routes, "BATCH_TURN_WAIT_S", 0.3)
    routes.BATCHES_AT_ONCE.acquire()
    routes.BATCHES_AT_ONCE.acquire()
    try:
        started = time.monotonic()
        resp = submit_batch(client, auth, [png_bytes()])
        waited = time.monotonic() - started
    finally:
        routes.BATCHES_AT_ONCE.release()
        routes.BATCHES_AT_ONCE.release()
    assert resp.status_code == 503
    assert resp.get_json()["error"] == "batches_busy"
    assert resp.headers["Retry-After"] == "1"
    assert 0.25 <= waited < 3
    assert job_count(settings) == 0
    assert submit_batch(client, auth, [png_bytes()]).status_code == 202  # both turns given back


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart body of (name, filename or None, content) parts, and its Content-Type."""
    boundary = "segsvc-test-boundary"
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("field", ["webhook", "webhook_events"])
@pytest.mark.parametrize("path", ["/v1/jobs/batch", "/v1/jobs"])
def test_a_webhook_field_sent_as_a_file_is_refused_and_stores_nothing(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, path: str, field: str
) -> None:
    """Regression: `curl -F webhook=@url.txt` sends the field with a filename, which werkzeug
    files as an upload: the form never saw it, and the job was stored without its webhook."""
    image = encode_image(Image.new("RGB", (64, 48), (120, 80, 40)))
    value = b"https://hooks.example/x" if field == "webhook" else b"start"
    body, content_type = multipart([("image", "a.png", image), (field, "hook.txt", value)])
    resp = client.post(path, headers={**auth, "Content-Type": content_type}, data=body)
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"] == "bad_request"
    assert f"'{field}' came as a file upload" in resp.get_json()["message"]
    assert job_count(settings) == 0


@pytest.mark.parametrize("path", ["/v1/jobs/batch", "/v1/jobs"])
def test_an_image_part_without_a_filename_is_refused_and_stores_nothing(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, path: str
) -> None:
    """curl -F "image=<x.jpg" sends a part without a filename, which werkzeug files as text: a
    batch dropped it, stored the other images and answered 202."""
    image = encode_image(Image.new("RGB", (64, 48), (120, 80, 40)))
    parts = [("image", "a.png", image), ("image", None, image)]
    body, content_type = multipart(parts if "batch" in path else parts[1:])
    resp = client.post(path, headers={**auth, "Content-Type": content_type}, data=body)
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"] == "bad_request"
    assert "without a filename" in resp.get_json()["message"]
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_the_flask_the_project_allows_lets_a_batch_raise_its_own_body_limit() -> None:
    """The batch submit assigns request.max_content_length, which Flask 3.0 does not allow
    (a read-only property there: every batch a 500); pyproject must not allow 3.0."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (flask,) = [
        Requirement(raw)
        for raw in pyproject["project"]["optional-dependencies"]["api"]
        if Requirement(raw).name == "flask"
    ]
    assert not flask.specifier.contains("3.0.3")
    assert flask.specifier.contains("3.1.0")
    settable = getattr(Request.max_content_length, "fset", None)
    assert settable is not None  # the installed one: a property with a setter
