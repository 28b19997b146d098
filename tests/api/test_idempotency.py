"""`Idempotency-Key` on POST /v1/jobs."""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
from PIL import Image
from sqlalchemy import update

from segsvc.db import session_scope
from segsvc.ml.preprocess import encode_mask_png
from segsvc.models import Job, WebhookEndpoint, utcnow
from segsvc.settings import Settings
from tests.api.test_long_poll import finish_next_job


def png(color: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def submit(client, auth, key: str | None, data: bytes, **fields: str):  # type: ignore[no-untyped-def]
    headers = dict(auth) | ({"Idempotency-Key": key} if key is not None else {})
    return client.post(
        "/v1/jobs",
        headers=headers,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(data), "a.png"), **fields},
    )


def count_jobs(settings: Settings) -> int:
    with session_scope(settings) as session:
        return session.query(Job).count()


def test_idempotency_same_key_same_body_returns_same_job(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    first = submit(client, auth, "order-1", png())
    again = submit(client, auth, "order-1", png())
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert count_jobs(settings) == 1


def test_idempotency_same_key_other_body_is_422(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    assert submit(client, auth, "order-2", png()).status_code == 202
    other = submit(client, auth, "order-2", png((9, 9, 9)))
    assert other.status_code == 422
    assert other.get_json()["error"] == "validation_error"
    assert submit(client, auth, "order-2", png(), extra="field").status_code == 422
    assert count_jobs(settings) == 1


def test_idempotency_keys_are_per_client(client, auth, admin_key, settings) -> None:  # type: ignore[no-untyped-def]
    mine = submit(client, auth, "shared", png()).get_json()["id"]
    theirs = submit(client, {"Authorization": f"Bearer {admin_key}"}, "shared", png())
    assert theirs.status_code == 202
    assert theirs.get_json()["id"] != mine


def test_idempotency_key_expires_after_24h(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    old = submit(client, auth, "daily", png()).get_json()["id"]
    with session_scope(settings) as session:
        session.execute(update(Job).values(created_at=utcnow() - timedelta(hours=25)))
    new = submit(client, auth, "daily", png())
    assert new.status_code == 202
    assert new.get_json()["id"] != old
    assert count_jobs(settings) == 2


def test_idempotency_without_key_creates_each_time(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    submit(client, auth, None, png())
    submit(client, auth, None, png())
    assert count_jobs(settings) == 2


def test_idempotency_malformed_key_is_422(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    for key in ("", "x" * 256, "tab\tkey"):
        resp = submit(client, auth, key, png())
        assert resp.status_code == 422, key
    assert count_jobs(settings) == 0


def test_idempotent_retry_replays_even_if_its_webhook_was_disabled_since(  # type: ignore[no-untyped-def]
    open_client, auth, settings
) -> None:
    """A retry after a lost answer must get its job back, not a 422 about a webhook URL that
    was checked when the job was made and has been disabled (a 410) since."""
    hook = "http://127.0.0.1:9/hook"
    first = submit(open_client, auth, "order-hook", png(), webhook=hook)
    assert first.status_code == 202
    with session_scope(settings) as session:
        job = session.get(Job, first.get_json()["id"])
        assert job is not None
        session.add(
            WebhookEndpoint(
                client_id=job.client_id, url=hook, disabled_at=utcnow(), disabled_reason="410"
            )
        )
    again = submit(open_client, auth, "order-hook", png(), webhook=hook)
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    fresh = submit(open_client, auth, "order-hook-2", png(), webhook=hook)  # a new job still checks
    assert fresh.status_code == 422
    assert "disabled" in fresh.get_json()["message"]


def keyed_wait(client, auth, key: str, data: bytes, wait: float, accept: str | None = None):  # type: ignore[no-untyped-def]
    headers = dict(auth) | {"Idempotency-Key": key} | ({"Accept": accept} if accept else {})
    return client.post(
        f"/v1/jobs?wait={wait}",
        headers=headers,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(data), "a.png")},
    )


def test_a_lost_mask_answer_is_replayed_as_the_mask(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    """`curl -H 'Accept: image/png' ...?wait=10 -o mask.png` retried with its key after the
    201 was lost: the replay is the mask again (it was the short JSON, saved as mask.png)."""
    mask = encode_mask_png(np.ones((16, 16), np.uint8))
    worker = finish_next_job(settings, mask_png=mask)
    first = keyed_wait(client, auth, "seg-1", png(), 10, accept="image/png")
    worker.join()
    assert (first.status_code, first.mimetype) == (201, "image/png")
    again = keyed_wait(client, auth, "seg-1", png(), 10, accept="image/png")
    assert (again.status_code, again.mimetype, again.data) == (201, "image/png", mask)
    assert again.headers["Idempotent-Replayed"] == "1"
    assert again.headers["X-Job-Id"] == first.headers["X-Job-Id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert count_jobs(settings) == 1


def test_a_replay_waits_for_its_job_as_the_first_request_did(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    """A retry with `?wait=` of a job still running holds its answer for the job's end, then
    is the finished job (201, with its error), not the short JSON at once."""
    first = submit(client, auth, "slow-1", png())
    assert first.status_code == 202
    quick = keyed_wait(client, auth, "slow-1", png(), 0.2)  # nothing ends within the wait
    assert (quick.status_code, quick.get_json()["status"]) == (200, "queued")
    worker = finish_next_job(settings, status="failed")
    again = keyed_wait(client, auth, "slow-1", png(), 10)
    worker.join()
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "1"
    body = again.get_json()
    assert (body["id"], body["status"]) == (first.get_json()["id"], "failed")
    assert {"error", "metrics"} <= body.keys()  # the whole job, as a first 201 has
    assert count_jobs(settings) == 1


def test_a_replay_is_found_without_decoding_the_upload(client, auth, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A keyed retry needs the upload's sha256 only: no decode (a large one would wait for the
    process's large-decode turn, and answer a 503 instead of the stored job)."""
    from api.routes import jobs as routes

    first = submit(client, auth, "no-decode", png())
    batch = client.post(
        "/v1/jobs/batch",
        headers=dict(auth) | {"Idempotency-Key": "no-decode-batch"},
        content_type="multipart/form-data",
        data={"image": [(io.BytesIO(png()), "a.png"), (io.BytesIO(png((4, 5, 6))), "b.png")]},
    )
    assert (first.status_code, batch.status_code) == (202, 202)

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("a replay decoded its upload")

    monkeypatch.setattr(routes, "validate_image", no_decode)
    again = submit(client, auth, "no-decode", png())
    assert (again.status_code, again.get_json()["id"]) == (200, first.get_json()["id"])
    batch_again = client.post(
        "/v1/jobs/batch",
        headers=dict(auth) | {"Idempotency-Key": "no-decode-batch"},
        content_type="multipart/form-data",
        data={"image": [(io.BytesIO(png()), "a.png"), (io.BytesIO(png((4, 5, 6))), "b.png")]},
    )
    assert batch_again.status_code == 200
    assert batch_again.get_json() == batch.get_json()


def _twice(auth: dict[str, str], *keys: str) -> list[tuple[str, str]]:
    """Headers with Idempotency-Key sent once per key, each on its own line."""
    return [*auth.items(), *(("Idempotency-Key", key) for key in keys)]


def test_a_repeated_idempotency_key_header_is_422_and_stores_nothing(  # type: ignore[no-untyped-def]
    client, auth, settings
) -> None:
    """Regression: a repeated header reaches the app folded ("k1, k2"; gunicorn joins with a
    bare comma), and was taken as a new key: a new job where a replay of k1 was expected."""
    first = submit(client, auth, "k1", png())
    assert first.status_code == 202
    for headers in (
        _twice(auth, "k1", "k2"),
        _twice(auth, "k1", "k1"),
        _twice(auth, "k3", "k4"),
        {**auth, "Idempotency-Key": "k1,k2"},  # as gunicorn folds them
    ):
        resp = client.post(
            "/v1/jobs",
            headers=headers,
            content_type="multipart/form-data",
            data={"image": (io.BytesIO(png()), "a.png")},
        )
        assert resp.status_code == 422, (headers, resp.get_json())
        assert resp.get_json()["error"] == "validation_error"
        assert "sent more than once" in resp.get_json()["message"]
    assert count_jobs(settings) == 1


def test_a_repeated_idempotency_key_header_on_a_batch_is_422_and_stores_nothing(  # type: ignore[no-untyped-def]
    client, auth, settings
) -> None:
    from tests.api.test_batch import submit_batch

    assert submit_batch(client, auth, [png()], headers={"Idempotency-Key": "b1"}).status_code == 202
    for headers in (_twice(auth, "b1", "b2"), _twice(auth, "b3", "b4")):
        resp = client.post(
            "/v1/jobs/batch",
            headers=headers,
            content_type="multipart/form-data",
            data={"image": [(io.BytesIO(png()), "a.png"), (io.BytesIO(png((4, 5, 6))), "b.png")]},
        )
        assert resp.status_code == 422, (headers, resp.get_json())
        assert resp.get_json()["error"] == "validation_error"
        assert "sent more than once" in resp.get_json()["message"]
    assert count_jobs(settings) == 1
