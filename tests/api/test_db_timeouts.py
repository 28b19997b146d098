"""A statement Postgres cancels at the API's statement or lock timeout: 503 `database_timeout`
with Retry-After, never a 500 and never a request hung behind a lock."""

from __future__ import annotations

import io
import time
import uuid

import psycopg
import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError
from werkzeug.test import TestResponse

from api.app import create_app
from segsvc.db import get_engine, session_scope
from segsvc.models import Job, WebhookMessage
from segsvc.settings import Settings
from tests.api.test_jobs import png_bytes
from tests.segsvc.test_db import holding
from tests.segsvc.webhooks.receiver import LOOPBACK_ONLY

HOLD_S = 3.0  # how long a test's lock holder keeps its locks: old code waited that long


def limited_client(settings: Settings, **limits: float) -> FlaskClient:
    """An API with these limits (seconds) whose webhooks may target loopback."""
    cfg = settings.model_copy(update={"webhook_allow_networks": LOOPBACK_ONLY, **limits})
    return create_app(cfg).test_client()


def submit(client: FlaskClient, auth: dict[str, str], **fields: str) -> str:
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        data={"image": (io.BytesIO(png_bytes()), "pet.png"), **fields},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 202, resp.data
    job_id: str = resp.get_json()["id"]
    return job_id


def assert_database_timeout(resp: TestResponse, started: float) -> None:
    assert time.monotonic() - started < HOLD_S - 1, "the request waited for the lock"
    assert resp.status_code == 503, resp.data
    body = resp.get_json()
    assert body["error"] == "database_timeout"
    assert "try again" in body["message"]
    assert int(resp.headers["Retry-After"]) >= 1


def idle_in_transaction(settings: Settings) -> int:
    """Connections to the test database left inside a transaction."""
    with get_engine(settings).connect() as conn:
        count = conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
            )
        )
    return int(count or 0)


def test_read_stuck_behind_a_migration_lock_answers_503_database_timeout(
    settings: Settings, auth: dict[str, str]
) -> None:
    # Regression: no statement_timeout was set, so a read queued behind a migration's
    # ACCESS EXCLUSIVE lock held its request thread and pooled connection until the lock went.
    client = limited_client(settings, api_statement_timeout_seconds=0.3, db_lock_timeout_seconds=0)
    job_id = submit(client, auth)
    assert settings.database_url is not None
    with holding(settings.database_url, "LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE", seconds=HOLD_S):
        started = time.monotonic()
        resp = client.get(f"/v1/jobs/{job_id}", headers=auth)
        assert_database_timeout(resp, started)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200


def test_write_past_the_lock_timeout_answers_503_and_keeps_nothing(
    settings: Settings, auth: dict[str, str]
) -> None:
    client = limited_client(settings, db_lock_timeout_seconds=0.3)
    job_id = submit(client, auth, webhook="http://127.0.0.1:9/hook")
    assert settings.database_url is not None
    # Canceling updates the job, then adds its webhook message: the holder blocks the second
    # write, so the first one has to be rolled back.
    with holding(
        settings.database_url, "LOCK TABLE webhook_messages IN SHARE MODE", seconds=HOLD_S
    ):
        started = time.monotonic()
        resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
        assert_database_timeout(resp, started)
    with session_scope(settings) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        assert (job.status, job.cancel_requested) == ("queued", False)
        messages = select(func.count()).select_from(WebhookMessage)
        assert session.scalar(messages.where(WebhookMessage.job_id == job.id)) == 0
    assert idle_in_transaction(settings) == 0  # the request's session was rolled back
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 200
    assert again.get_json()["status"] == "canceled"


def test_long_poll_outlasts_the_statement_timeout(settings: Settings, auth: dict[str, str]) -> None:
    # `?wait=` holds no connection while it waits, so a long poll is not one long statement.
    client = limited_client(settings, api_statement_timeout_seconds=0.3)
    job_id = submit(client, auth)
    started = time.monotonic()
    resp = client.get(f"/v1/jobs/{job_id}?wait=1.5", headers=auth)
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "queued"
    assert time.monotonic() - started >= 1.4
    app_settings: Settings = client.application.config["SEG_SETTINGS"]
    with pytest.raises(OperationalError) as caught, get_engine(app_settings).connect() as conn:
        conn.execute(text("SELECT pg_sleep(1.5)"))  # a statement that long is cancelled
    assert isinstance(caught.value.orig, psycopg.errors.QueryCanceled)
