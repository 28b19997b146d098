"""Retries of the Python client (segsvc/client.py): 429s wait within a time budget instead of
using up the retries; a 408 is retried as a lost connection and ends as one."""

from __future__ import annotations

import json
from typing import Any

import pytest
from werkzeug.wrappers import Request, Response

from segsvc.bulk_submit import EXIT_SERVER, exit_code_for
from segsvc.client import Client
from segsvc.client_errors import RateLimitedError, TransportError
from tests.live import serve
from tests.segsvc.test_client import J1, Scripted

JOB = {"id": J1, "status": "queued"}
TIMEOUT_408 = {"error": "request_timeout", "message": "The request's body did not arrive in time."}


def limited(code: str = "rate_limited") -> tuple[int, dict[str, str], Any]:
    return 429, {"Retry-After": "0"}, {"error": code, "message": "wait"}


@pytest.mark.parametrize("code", ["rate_limited", "batches_pending", "large_decodes_pending"])
def test_429s_do_not_use_up_the_retries_within_the_wait_budget(code: str) -> None:
    """Regression (rev3a): at `-j 4 -b 16` the batches waiting for the same rate tokens each
    spent their 5 retries on 429s, and their files became errors."""
    stub = Scripted([limited(code)] * 8 + [(202, {}, JOB)])
    with serve(stub) as url, Client(url, "k", retries=1, rate_wait_budget=60.0) as client:
        assert client.submit(b"png", filename="a.png").id == J1
    assert len(stub.times) == 9


def test_429s_past_the_wait_budget_use_the_retries() -> None:
    stub = Scripted([limited()])
    with (
        serve(stub) as url,
        Client(url, "k", retries=2, rate_wait_budget=0.0) as client,
        pytest.raises(RateLimitedError),
    ):
        client.submit(b"png", filename="a.png")
    assert len(stub.times) == 3


def test_429_pauses_are_jittered() -> None:
    """Waiters told the same Retry-After must not all wake at the same instant."""
    stub = Scripted([limited()] * 6 + [(202, {}, JOB)])
    with serve(stub) as url, Client(url, "k", retries=0) as client:
        client.submit(b"png", filename="a.png")
    gaps = [b - a for a, b in zip(stub.times, stub.times[1:], strict=False)]
    assert len({round(g, 3) for g in gaps}) > 1


class OnceTimedOut:
    """Answers the first POST with the API's 408, then takes everything; counts the POSTs."""

    def __init__(self, times: int = 1) -> None:
        self.times = times
        self.posts: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        req.get_data()
        self.posts.append(req.path)
        if len(self.posts) <= self.times:
            code, body = 408, TIMEOUT_408
        elif req.path == "/v1/jobs/batch":
            n = len(req.files.getlist("image"))
            code, body = 202, {"jobs": [JOB] * n}
        else:
            code, body = 202, JOB
        resp = Response(json.dumps(body), status=code, mimetype="application/json")
        if code == 408:
            resp.headers["Connection"] = "close"
        return resp(environ, start_response)


def test_client_submit_retries_a_408() -> None:
    stub = OnceTimedOut()
    with serve(stub) as url, Client(url, "k", retries=3) as client:
        job = client.submit(b"png", filename="a.png")  # was: InvalidRequestError 408
    assert job.id == J1
    assert stub.posts == ["/v1/jobs", "/v1/jobs"]


def test_a_408_through_the_retries_is_a_network_failure() -> None:
    stub = OnceTimedOut(times=99)
    with (
        serve(stub) as url,
        Client(url, "k", retries=1) as client,
        pytest.raises(TransportError) as caught,
    ):
        client.submit(b"png", filename="a.png")
    assert len(stub.posts) == 2
    assert exit_code_for(caught.value) == EXIT_SERVER
