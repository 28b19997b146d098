"""The JSON error responses of api/errors.py."""

from __future__ import annotations

import io
from typing import Any

import pytest
from flask import Flask
from gunicorn.http.errors import ChunkMissingTerminator, InvalidChunkSize, NoMoreData

from api.errors import error_response


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.4, "2"), (2.5, "3"), (59.01, "60")],
)
def test_error_response_rounds_retry_after_up(seconds: float, header: str) -> None:
    # Regression: round() told a client 1 s for 1.4 s, and it retried into another refusal.
    with Flask(__name__).app_context():
        resp = error_response("rate_limited", "Slow down.", 429, seconds)
    assert resp.headers["Retry-After"] == header
    assert resp.get_json() == {"error": "rate_limited", "message": "Slow down."}


def test_error_response_without_retry_after_sends_no_header() -> None:
    with Flask(__name__).app_context():
        resp = error_response("not_found", "No such job.", 404)
    assert "Retry-After" not in resp.headers
    assert resp.status_code == 404


class _BadlyFramed(io.RawIOBase):
    """A request body as gunicorn's `wsgi.input` reads a chunked one whose framing is broken."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [InvalidChunkSize(b"zz"), ChunkMissingTerminator(b"XX"), NoMoreData(b"")],
    ids=type,
)
def test_a_badly_framed_body_is_400_not_500(  # type: ignore[no-untyped-def]
    client, auth, caplog: pytest.LogCaptureFixture, exc: Exception
) -> None:
    """gunicorn raises these plain exceptions from `wsgi.input` while the app reads the form
    (a bad chunk size or terminator, the client gone mid-chunk): they were 500
    `internal_error`, logged with a traceback."""
    resp = client.post(
        "/v1/jobs",
        headers={**auth, "Transfer-Encoding": "chunked"},
        content_type="multipart/form-data; boundary=b",
        environ_overrides={"wsgi.input": _BadlyFramed(exc), "wsgi.input_terminated": True},
    )
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"] == "bad_request"
    if not isinstance(exc, NoMoreData):  # an OSError: werkzeug answers it as a disconnect
        assert resp.get_json()["message"].startswith("The request body's chunked framing")
    assert not [r for r in caplog.records if r.exc_info], "no traceback logged"
