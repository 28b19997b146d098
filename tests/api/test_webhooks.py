"""Webhook fields on submit (with SSRF refusals through the API), secrets, the delivery log."""

from __future__ import annotations

import io
import uuid

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from segsvc.db import session_scope
from segsvc.models import Job, WebhookEndpoint, WebhookMessage, db_time
from segsvc.settings import Settings
from tests.segsvc.webhooks.factories import finish_job, png_bytes, start_job


def submit(client: FlaskClient, auth: dict[str, str], **fields: object):  # type: ignore[no-untyped-def]
    data = {"image": (io.BytesIO(png_bytes()), "pet.png"), **fields}
    return client.post("/v1/jobs", headers=auth, data=data, content_type="multipart/form-data")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:9/hook",
        "http://[::1]:9/hook",
        "http://[::ffff:127.0.0.3]:9/hook",
        "http://localhost:9/hook",
    ],
)
def test_submit_refuses_loopback_webhook(client, auth, settings: Settings, url: str) -> None:  # type: ignore[no-untyped-def]
    resp = submit(client, auth, webhook=url)
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["error"] == "validation_error"
    # A literal address names its reason; a host name gets one message for every refusal.
    assert ("loopback" if "localhost" not in url else "not resolve to a public") in body["message"]
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"webhook": "ftp://hooks.example/x"}, "http"),
        ({"webhook": "http://127.0.0.1:9/", "webhook_events": "start,done"}, "Unknown"),
        ({"webhook_events": "start"}, "needs a 'webhook'"),
    ],
)
def test_submit_refuses_bad_webhook_fields(open_client, auth, fields, needle: str) -> None:  # type: ignore[no-untyped-def]
    resp = submit(open_client, auth, **fields)
    assert resp.status_code == 422
    assert needle in resp.get_json()["message"]


@pytest.mark.parametrize(
    ("events", "stored"),
    [
        (None, ["completed"]),
        ("start", ["start"]),
        ("completed, start", ["start", "completed"]),
        (["start", "completed"], ["start", "completed"]),
    ],
)
def test_submit_stores_webhook_and_events(open_client, auth, settings, events, stored) -> None:  # type: ignore[no-untyped-def]
    fields = {"webhook": "http://127.0.0.1:9/hook"}
    if events is not None:
        fields["webhook_events"] = events
    resp = submit(open_client, auth, **fields)
    assert resp.status_code == 202, resp.get_json()
    with session_scope(settings) as session:
        job = session.get(Job, uuid.UUID(resp.get_json()["id"]))
        assert job is not None
        assert (job.webhook_url, job.webhook_events) == ("http://127.0.0.1:9/hook", stored)


def test_secret_is_stable_per_client_and_rotates(client, auth, admin_key: str) -> None:  # type: ignore[no-untyped-def]
    key = client.get("/v1/webhooks/secret", headers=auth).get_json()["key"]
    assert key.startswith("whsec_")
    assert client.get("/v1/webhooks/secret", headers=auth).get_json()["key"] == key
    other = client.get(
        "/v1/webhooks/secret", headers={"Authorization": f"Bearer {admin_key}"}
    ).get_json()["key"]
    assert other != key
    rotated = client.post("/v1/webhooks/secret/rotate", headers=auth)
    assert rotated.status_code == 200
    assert rotated.get_json()["key"] not in (key, other)
    assert (
        client.get("/v1/webhooks/secret", headers=auth).get_json()["key"]
        == (rotated.get_json()["key"])
    )


def test_secret_needs_auth(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/v1/webhooks/secret").status_code == 401


def test_delivery_log_lists_and_redelivers(open_client, auth, settings, admin_key) -> None:  # type: ignore[no-untyped-def]
    resp = submit(open_client, auth, webhook="http://127.0.0.1:9/hook", webhook_events="start")
    job_id = resp.get_json()["id"]
    start_job(settings, uuid.UUID(job_id))
    log = open_client.get(f"/v1/jobs/{job_id}/webhooks", headers=auth).get_json()["messages"]
    assert [(m["event_type"], m["status"], m["attempts"]) for m in log] == [
        ("job.started", "pending", 0)
    ]
    assert log[0]["attempt_log"] == []
    with session_scope(settings) as session:  # as after a 410 Gone: failed, endpoint disabled
        message = session.get(WebhookMessage, log[0]["id"])
        assert message is not None
        message.status, message.next_attempt_at = "failed", None
        message.completed_at = db_time(session)
        session.add(
            WebhookEndpoint(
                client_id=message.client_id,
                url=message.url,
                disabled_at=db_time(session),
                disabled_reason="410 Gone",
            )
        )
    url = f"/v1/jobs/{job_id}/webhooks/{log[0]['id']}/redeliver"
    again = open_client.post(url, headers=auth)
    assert again.status_code == 202
    assert again.get_json()["status"] == "pending"
    with session_scope(settings) as session:  # due now, and its endpoint enabled again
        message = session.get(WebhookMessage, log[0]["id"])
        assert message is not None
        assert (message.status, message.completed_at) == ("pending", None)
        assert message.next_attempt_at is not None
        assert abs((db_time(session) - message.next_attempt_at).total_seconds()) < 5
        endpoint = session.scalars(select(WebhookEndpoint)).one()
        assert (endpoint.disabled_at, endpoint.disabled_reason) == (None, None)
    stranger = {"Authorization": f"Bearer {admin_key}"}
    assert open_client.get(f"/v1/jobs/{job_id}/webhooks", headers=stranger).status_code == 404
    assert open_client.post(url, headers=stranger).status_code == 404
    missing = f"/v1/jobs/{job_id}/webhooks/msg_nope/redeliver"
    assert open_client.post(missing, headers=auth).status_code == 404


def test_completed_message_carries_job_json(open_client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(open_client, auth, webhook="http://127.0.0.1:9/hook").get_json()["id"]
    finish_job(settings, start_job(settings, uuid.UUID(job_id)))
    (msg,) = open_client.get(f"/v1/jobs/{job_id}/webhooks", headers=auth).get_json()["messages"]
    assert msg["event_type"] == "job.completed"
    with session_scope(settings) as session:  # what the dispatcher will send
        message = session.get(WebhookMessage, msg["id"])
        assert message is not None
        payload = message.payload
    assert payload["id"] == job_id
    assert payload["status"] == "succeeded"
    assert payload["result"]["class_fractions"] == [0.5, 0.4, 0.1]
    assert payload["model_version"] == "test-v1"


def test_redeliver_takes_a_rate_token(auth, settings) -> None:  # type: ignore[no-untyped-def]
    """Each redeliver makes the service POST to the client's URL: it was not limited at all."""
    from api.app import create_app

    limited = settings.model_copy(
        update={
            "webhook_allow_networks": "127.0.0.0/8",
            "rate_limit_per_minute": 1,
            "rate_limit_burst": 2,
        }
    )
    client = create_app(limited).test_client()
    resp = submit(client, auth, webhook="http://127.0.0.1:9/hook", webhook_events="start")
    job_id = resp.get_json()["id"]  # one token
    start_job(settings, uuid.UUID(job_id))
    (message,) = client.get(f"/v1/jobs/{job_id}/webhooks", headers=auth).get_json()["messages"]
    url = f"/v1/jobs/{job_id}/webhooks/{message['id']}/redeliver"
    assert client.post(url, headers=auth).status_code == 202  # the other
    refused = client.post(url, headers=auth)
    assert refused.status_code == 429
    assert refused.get_json()["error"] == "rate_limited"


def test_secret_rotation_takes_a_rate_limit_token(settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    client = create_app(
        settings.model_copy(update={"rate_limit_per_minute": 1, "rate_limit_burst": 2})
    ).test_client()
    codes = [client.post("/v1/webhooks/secret/rotate", headers=auth).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
