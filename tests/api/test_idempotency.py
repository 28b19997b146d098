"""`Idempotency-Key` on POST /v1/jobs."""

from __future__ import annotations

import io
from datetime import timedelta

from PIL import Image
from sqlalchemy import update

from segsvc.db import session_scope
from segsvc.models import Job, WebhookEndpoint, utcnow
from segsvc.settings import Settings


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
