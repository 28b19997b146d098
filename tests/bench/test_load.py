"""bench/load.py: what the load generator measures."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import load, system
from tests.live import serve


def one_client_against(api: Any, seconds: float) -> load.LoadResult:
    """`run_jobs_load` with one client submitting with `?wait=` to the WSGI app `api`."""
    body = load.Multipart((("pet.jpg", b"jpeg"),))
    with serve(api) as url:
        port = int(url.rsplit(":", 1)[1])
        return load.run_jobs_load(
            port, {}, [body], clients=1, seconds=seconds, poll_s=0.01, wait_s=10
        )


def test_latency_is_what_the_client_sees_not_the_jobs_completed_at() -> None:
    """The server stamps completed_at 0.25 s before the client holds the finished job (the
    worker's commit, its notice and the answer come after that stamp): the latency counts
    them too."""

    def api(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if environ["PATH_INFO"].endswith("/mask.png"):
            start_response("200 OK", [("Content-Type", "image/png")])
            return [b"\x89PNG\r\n\x1a\n"]
        stamped = datetime.now(UTC).isoformat()
        time.sleep(0.25)
        job = {
            "id": "j1",
            "status": "succeeded",
            "completed_at": stamped,
            "metrics": {"batch_size": 1},
        }
        start_response("201 CREATED", [("Content-Type", "application/json")])
        return [json.dumps(job).encode()]

    result = one_client_against(api, seconds=0.6)
    assert result.done >= 1
    assert min(result.latencies) >= 0.25


def test_a_job_counts_once_its_mask_is_fetched_as_the_naive_baseline_returns_it() -> None:
    """The naive Flask baseline answers with the mask PNG; the system's clients stopped at the
    job's JSON, a whole request (and a Postgres read) short of it."""
    fetched: list[str] = []

    def api(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if environ["PATH_INFO"].endswith("/mask.png"):
            fetched.append(environ["PATH_INFO"])
            start_response("404 NOT FOUND", [("Content-Type", "application/json")])
            return [b"{}"]
        job = {"id": "j1", "status": "succeeded", "metrics": {"batch_size": 1}}
        start_response("201 CREATED", [("Content-Type", "application/json")])
        return [json.dumps(job).encode()]

    result = one_client_against(api, seconds=0.3)
    assert fetched
    assert set(fetched) == {"/v1/jobs/j1/mask.png"}
    assert result.done == 0  # no mask, no result
    assert result.errors >= 1


def test_a_submit_answered_with_its_mask_counts_in_one_round_trip() -> None:
    """With `?wait=` the clients ask for `Accept: image/png`: a job done in time answers with
    its mask, as the naive baseline does; its batch size is read after the run."""
    paths: list[str] = []

    def api(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        paths.append(environ["PATH_INFO"])
        if environ["REQUEST_METHOD"] == "POST":
            assert environ["HTTP_ACCEPT"] == "image/png"
            start_response("201 CREATED", [("Content-Type", "image/png"), ("X-Job-Id", "j1")])
            return [load.PNG_MAGIC + b"rest"]
        jobs = [{"id": "j1", "status": "succeeded", "metrics": {"batch_size": 3}}]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"jobs": jobs}).encode()]

    result = one_client_against(api, seconds=0.3)
    assert result.done >= 1
    assert result.errors == 0
    assert set(result.batch_sizes) == {3}
    assert not any(p.endswith("mask.png") for p in paths)


def test_an_upload_the_plain_hello_leaves_unread_is_resent_not_an_error(tmp_path: Path) -> None:
    """gunicorn closes a connection after answering a request whose body the app left unread
    past 64 KiB, without saying so: the client sends such a request again on a new connection,
    as a client pool does, rather than count gunicorn's close as the hello failing."""
    body = load.Multipart((("pet.jpg", os.urandom(200_000)),))
    port = system.free_port()
    args = ["--workers", "1", "--threads", "4", "--config", "python:api.gunicorn_conf"]
    hello = system.gunicorn("hello", "bench.hello_app:app", port, dict(os.environ), tmp_path, args)
    try:
        result = load.run_request_load(
            port, "/hello", {}, [body], clients=2, seconds=1.0, expect=200
        )
    finally:
        hello.stop()
    assert result.done >= 10
    assert result.errors == 0
    assert result.retries >= 1  # gunicorn did close connections: the case above happened


def test_a_burst_submit_the_api_asks_to_retry_is_sent_again_not_an_error() -> None:
    """One key's batch submits past the 4 an API process lets wait get `429 batches_pending`
    with Retry-After: `segsvc.client` waits and sends again, and so does the burst now; it
    counted 256 errors (16 batches of 16) where a client would have had none."""
    posts: list[int] = []

    def api(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if environ["REQUEST_METHOD"] == "POST":
            posts.append(1)
            if len(posts) == 1:
                start_response(
                    "429 TOO MANY REQUESTS",
                    [("Content-Type", "application/json"), ("Retry-After", "0")],
                )
                return [b'{"error": "batches_pending"}']
            start_response("202 ACCEPTED", [("Content-Type", "application/json")])
            return [json.dumps({"id": "j1"}).encode()]
        job = {
            "id": "j1",
            "status": "succeeded",
            "completed_at": datetime.now(UTC).isoformat(),
            "metrics": {"batch_size": 1},
        }
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(job).encode()]

    body = load.Multipart((("pet.jpg", b"jpeg"),))
    with serve(api) as url:
        result = load.run_burst(int(url.rsplit(":", 1)[1]), {}, [body], jobs=1, clients=1)
    assert len(posts) == 2
    assert (result.done, result.errors, result.retries) == (1, 0, 1)
