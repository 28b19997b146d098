"""POST /v1/jobs/<id>/feedback over HTTP: validation errors, storage, and client scoping."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from sqlalchemy import select

from segsvc.db import session_scope
from segsvc.models import Feedback, Job, JobStatus, utcnow
from segsvc.settings import Settings
from tests.segsvc.test_feedback import good_mask, photo_bytes, png


def submit_and_finish(
    client,
    auth: dict[str, str],
    settings: Settings,  # type: ignore[no-untyped-def]
    version: str = "test-v1",
) -> str:
    """Submit through the API, then mark the job served by `version` (no worker needed)."""
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(photo_bytes()), "p.jpg")},
    )
    assert resp.status_code == 202
    job_id = resp.get_json()["id"]
    with session_scope(settings) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.status, job.model_version, job.completed_at = JobStatus.SUCCEEDED, version, utcnow()
    return str(job_id)


def post(client, auth, job_id: str, **fields):  # type: ignore[no-untyped-def]
    data = {k: (io.BytesIO(v), "mask.png") if k == "mask" else v for k, v in fields.items()}
    return client.post(
        f"/v1/jobs/{job_id}/feedback", headers=auth, content_type="multipart/form-data", data=data
    )


def test_feedback_mask_and_rating_are_stored_with_the_model_version(
    client,
    auth,
    settings: Settings,  # type: ignore[no-untyped-def]
) -> None:
    job_id = submit_and_finish(client, auth, settings, version="v-7")
    resp = post(client, auth, job_id, mask=good_mask(), rating="bad")
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert body["model_version"] == "v-7"
    assert body["rating"] == "bad"
    assert body["has_mask"] is True
    with session_scope(settings) as session:
        row = session.scalar(select(Feedback))
        assert row is not None
        assert str(row.job_id) == job_id
        assert row.mask_png == good_mask()


def test_feedback_rating_alone_is_accepted(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit_and_finish(client, auth, settings)
    resp = post(client, auth, job_id, rating="good")
    assert resp.status_code == 201
    assert resp.get_json()["has_mask"] is False


def test_feedback_invalid_masks_get_422_with_a_reason(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit_and_finish(client, auth, settings)
    cases = {
        "81x60": png(np.ones((60, 81), np.uint8)),
        "single-channel": png(np.ones((60, 80, 3), np.uint8)),
        "found 7": png(np.full((60, 80), 7, np.uint8)),
    }
    for needle, data in cases.items():
        resp = post(client, auth, job_id, mask=data)
        assert resp.status_code == 422
        assert resp.get_json()["error"] == "invalid_mask"
        assert needle in resp.get_json()["message"]
    with session_scope(settings) as session:
        assert session.scalar(select(Feedback)) is None  # nothing half-written


def test_feedback_missing_fields_and_bad_rating(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit_and_finish(client, auth, settings)
    empty = post(client, auth, job_id)
    assert empty.status_code == 400
    assert empty.get_json()["error"] == "bad_request"
    bad = post(client, auth, job_id, rating="excellent")
    assert bad.status_code == 422
    assert bad.get_json()["error"] == "invalid_rating"


def test_feedback_on_an_unfinished_job_is_a_conflict(client, auth) -> None:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(photo_bytes()), "p.jpg")},
    )
    answer = post(client, auth, resp.get_json()["id"], rating="good")
    assert answer.status_code == 409


def test_feedback_on_another_clients_job_is_not_found(  # type: ignore[no-untyped-def]
    client, auth, admin_key: str, settings: Settings
) -> None:
    job_id = submit_and_finish(client, auth, settings)
    other = {"Authorization": f"Bearer {admin_key}"}
    assert post(client, other, job_id, rating="good").status_code == 404
    assert post(client, auth, str(uuid.uuid4()), rating="good").status_code == 404
    assert post(client, auth, "not-a-uuid", rating="good").status_code == 404


def test_feedback_needs_an_api_key(client, settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    job_id = submit_and_finish(client, auth, settings)
    assert post(client, {}, job_id, rating="good").status_code == 401


def test_feedback_takes_a_submission_token(settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    """A mask is decoded, as an upload is: feedback is rate-limited with the key's submits."""
    from api.app import create_app

    limited = settings.model_copy(update={"rate_limit_per_minute": 1, "rate_limit_burst": 2})
    client = create_app(limited).test_client()
    job_id = submit_and_finish(client, auth, settings)  # one token
    assert post(client, auth, job_id, rating="good").status_code == 201  # the other
    resp = post(client, auth, job_id, mask=good_mask())
    assert resp.status_code == 429
    assert resp.get_json()["error"] == "rate_limited"


def test_feedback_mask_part_without_a_filename_is_400(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Sent as text (no filename), the mask was ignored and the answer was 201, has_mask false."""
    job_id = submit_and_finish(client, auth, settings)
    resp = client.post(
        f"/v1/jobs/{job_id}/feedback",
        headers=auth,
        content_type="multipart/form-data",
        data={"mask": "not a file", "rating": "bad"},
    )
    assert resp.status_code == 400
    assert "without a filename" in resp.get_json()["message"]
    with session_scope(settings) as session:
        assert session.scalar(select(Feedback)) is None


@pytest.mark.parametrize("field", ["mask", "rating"])
def test_feedback_with_a_field_sent_twice_is_422(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, field: str
) -> None:
    """Regression: `.get()` took the first of two masks (or ratings) and dropped the other."""
    job_id = submit_and_finish(client, auth, settings)
    data: dict[str, object] = (
        {"mask": [(io.BytesIO(good_mask()), "a.png"), (io.BytesIO(good_mask()), "b.png")]}
        if field == "mask"
        else {"rating": ["good", "bad"]}
    )
    resp = client.post(
        f"/v1/jobs/{job_id}/feedback", headers=auth, content_type="multipart/form-data", data=data
    )
    assert resp.status_code == 422, resp.get_json()
    assert resp.get_json()["error"] == "validation_error"
    assert f"'{field}' was sent more than once" in resp.get_json()["message"]
    with session_scope(settings) as session:
        assert session.scalar(select(Feedback)) is None


def test_feedback_rating_sent_as_a_file_is_400(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Regression: a rating part with a filename was filed as an upload and never read: 201
    with the mask alone (or a 422 asking for a rating that was sent)."""
    job_id = submit_and_finish(client, auth, settings)
    resp = client.post(
        f"/v1/jobs/{job_id}/feedback",
        headers=auth,
        content_type="multipart/form-data",
        data={"mask": (io.BytesIO(good_mask()), "m.png"), "rating": (io.BytesIO(b"bad"), "r.txt")},
    )
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"] == "bad_request"
    assert "'rating' came as a file upload" in resp.get_json()["message"]
    with session_scope(settings) as session:
        assert session.scalar(select(Feedback)) is None


def test_a_large_feedback_mask_waits_for_a_large_decode_turn(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch
) -> None:
    from api.routes import jobs as routes
    from segsvc import images

    job_id = submit_and_finish(client, auth, settings)  # an 80 x 60 input
    monkeypatch.setattr(images, "LARGE_DECODE_PIXELS", 80 * 60 - 1)
    monkeypatch.setattr(routes, "LARGE_DECODE_WAIT_S", 0.2)
    routes.LARGE_DECODES_AT_ONCE.acquire()  # another large picture is being decoded
    try:
        busy = post(client, auth, job_id, mask=good_mask())
    finally:
        routes.LARGE_DECODES_AT_ONCE.release()
    assert busy.status_code == 503
    assert busy.get_json()["error"] == "large_decodes_busy"
    assert post(client, auth, job_id, mask=good_mask()).status_code == 201
