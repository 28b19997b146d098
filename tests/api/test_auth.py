from __future__ import annotations

import io
import logging
from typing import Any

import pytest
from PIL import Image
from werkzeug.test import EnvironBuilder

from segsvc.services import keys
from segsvc.settings import Settings
from tests.api.test_db_timeouts import idle_in_transaction


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="PNG")
    return buf.getvalue()


def test_v1_requires_bearer_key(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert resp.status_code == 401
    assert resp.get_json()["error"] == "unauthorized"


def test_v1_rejects_unknown_key(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/jobs/x", headers={"Authorization": "Bearer seg_nope"})
    assert resp.status_code == 401


def test_other_clients_job_is_404(client, auth, admin_key) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post(
        "/v1/jobs",
        headers=auth,
        data={"image": (io.BytesIO(png()), "a.png")},
        content_type="multipart/form-data",
    ).get_json()["id"]
    other = {"Authorization": f"Bearer {admin_key}"}
    assert client.get(f"/v1/jobs/{job_id}", headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200


def test_401_carries_www_authenticate(client) -> None:  # type: ignore[no-untyped-def]
    # RFC 9110 §15.5.2: a 401 must say which scheme to use.
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer seg_nope"}):
        resp = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=headers)
        assert resp.status_code == 401
        assert resp.get_json()["error"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_403_has_no_www_authenticate(client, auth) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/models", headers=auth)
    assert resp.status_code == 403
    assert "WWW-Authenticate" not in resp.headers


@pytest.mark.parametrize(
    "path", ["/v1/jobs", "/v1/jobs/batch", "/v1/models", "/v1/webhooks/secret"]
)
def test_options_answers_allow_without_a_key(client, path: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.options(path)
    assert resp.status_code == 200
    assert "OPTIONS" in resp.headers["Allow"]
    assert "WWW-Authenticate" not in resp.headers


def test_options_on_an_unknown_path_is_still_404(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.options("/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.get_json()["error"] == "not_found"


class _WatchedUpload(io.BytesIO):
    """A request body that records, as the server reads it, how many of this database's
    connections sit idle inside a transaction."""

    def __init__(self, data: bytes, settings: Settings) -> None:
        super().__init__(data)
        self.settings = settings
        self.idle_in_transaction: list[int] = []

    def _look(self) -> None:
        self.idle_in_transaction.append(idle_in_transaction(self.settings))

    def read(self, size: int | None = -1) -> bytes:
        self._look()
        return super().read(size)

    def readinto(self, buffer: Any) -> int:
        self._look()
        return super().readinto(buffer)


def test_a_key_lookup_holds_no_transaction_while_the_upload_is_read(  # type: ignore[no-untyped-def]
    client, auth, settings
) -> None:
    # A slow upload must not keep a pooled connection idle in a transaction (Postgres would end
    # it at SEG_DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS and the submit would fail).
    keys._auth_cache.clear()  # the lookup runs a query only when the key is not cached
    builder = EnvironBuilder(
        path="/v1/jobs",
        method="POST",
        headers=auth,
        data={"image": (io.BytesIO(png()), "a.png")},
        content_type="multipart/form-data",
    )
    framed = builder.get_request()
    body = framed.get_data()
    upload = _WatchedUpload(body, settings)
    resp = client.post(
        "/v1/jobs",
        headers={**auth, "Content-Type": framed.headers["Content-Type"]},
        input_stream=upload,
        content_length=len(body),
    )
    assert resp.status_code == 202, resp.get_json()
    assert upload.idle_in_transaction
    assert set(upload.idle_in_transaction) == {0}


def test_an_over_rate_keyed_retry_holds_no_transaction_while_its_upload_is_read(  # type: ignore[no-untyped-def]
    auth, settings
) -> None:
    # Regression: over the rate, the check that the key stored jobs opened a transaction the
    # upload then kept idle: past SEG_DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS Postgres ended it
    # and the client whose 202 was lost got a 503 instead of its replay.
    from api.app import create_app

    client = create_app(
        settings.model_copy(update={"rate_limit_per_minute": 1, "rate_limit_burst": 1})
    ).test_client()
    builder = EnvironBuilder(
        path="/v1/jobs",
        method="POST",
        headers={**auth, "Idempotency-Key": "lost-202"},
        data={"image": (io.BytesIO(png()), "a.png")},
        content_type="multipart/form-data",
    )
    framed = builder.get_request()
    body = framed.get_data()
    headers = {
        **auth,
        "Idempotency-Key": "lost-202",
        "Content-Type": framed.headers["Content-Type"],
    }
    first = client.post("/v1/jobs", headers=headers, data=body)
    assert first.status_code == 202, first.get_json()
    upload = _WatchedUpload(body, settings)
    again = client.post("/v1/jobs", headers=headers, input_stream=upload, content_length=len(body))
    assert again.status_code == 200, again.get_json()  # over the rate: the replay
    assert again.headers["Idempotent-Replayed"] == "1"
    assert upload.idle_in_transaction
    assert set(upload.idle_in_transaction) == {0}


def test_an_app_without_auth_says_so_in_its_log(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from api.app import create_app

    with caplog.at_level(logging.WARNING, logger="api.app"):
        create_app(settings)
        assert "SEG_AUTH_REQUIRED" not in caplog.text
        create_app(settings.model_copy(update={"auth_required": False}))
    assert "SEG_AUTH_REQUIRED is false: every caller is an admin" in caplog.text
