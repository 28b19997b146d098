"""The JSON error responses of api/errors.py."""

from __future__ import annotations

import pytest
from flask import Flask

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
