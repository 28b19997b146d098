"""api/gunicorn_worker.py: a request's headers and body must arrive in time, so clients that
stall or trickle them cannot hold all of gunicorn's threads (the real server, on loopback)."""

from __future__ import annotations

import io
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from segsvc.settings import Settings
from tests.conftest import ROOT, encode_image, free_port, stop_process, wait_http_up, worker_env

HEADER_S = 2.0
BODY_S = 1.5
MIN_RATE = 2000  # bytes/s
THREADS = 4


@contextmanager
def gunicorn(
    settings: Settings, tmp_path: Path, args: tuple[str, ...] = (), **env: str
) -> Iterator[str]:
    """The API under gunicorn_conf (one worker, `args` more), answering; its base URL."""
    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "-c", "python:api.gunicorn_conf"),
                *("api.wsgi:app", "--bind", f"127.0.0.1:{port}", "--workers", "1", *args),
            ],
            cwd=ROOT,
            env=worker_env(settings, SEG_METRICS_PORT="0", SEG_API_NICE="0", **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_up(base, proc, log_path)
        yield base
    finally:
        stop_process(proc)


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """The API under gunicorn_conf, one worker of THREADS threads, with short read timeouts."""
    with gunicorn(
        settings,
        tmp_path,
        ("--threads", str(THREADS), "--keep-alive", "10"),
        SEG_REQUEST_HEADER_TIMEOUT_SECONDS=str(HEADER_S),
        SEG_REQUEST_BODY_TIMEOUT_SECONDS=str(BODY_S),
        SEG_REQUEST_BODY_MIN_RATE=str(MIN_RATE),
    ) as base:
        yield base


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _upload(key: str) -> tuple[bytes, bytes]:
    """A `POST /v1/jobs` head and its multipart body."""
    png = encode_image(Image.frombytes("RGB", (64, 48), random.randbytes(64 * 48 * 3)), "PNG")
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--b--\r\n"
    )
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def _connect(base: str, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=30)
    sock.sendall(first)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """What the server sent before it closed the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _one_answer(sock: socket.socket) -> bytes:
    """One answer (its head and Content-Length body), the connection left open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data  # closed before a whole answer
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def _trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    for byte in data:
        if stop.wait(every):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


@pytest.mark.timeout(90)
def test_stalled_and_trickled_requests_free_every_thread_in_time(server: str, api_key: str) -> None:
    head, body = _upload(api_key)
    stalls = [_connect(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") for _ in range(2)]
    stalls += [_connect(server, head + body[:50]) for _ in range(2)]  # bodies that never end
    trickled = _connect(server, b"G")  # headers a byte every 0.3 s: a per-read timeout passes
    stop = threading.Event()
    feeder = threading.Thread(
        target=_trickle, args=(trickled, b"ET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 50, 0.3, stop)
    )
    feeder.start()
    try:
        time.sleep(0.5)  # every thread now holds one of them (THREADS + 1 connections)
        started = time.monotonic()
        with httpx.Client(base_url=server, timeout=HEADER_S + 6) as http:
            try:
                resp = http.get("/healthz")
            except httpx.TimeoutException:
                pytest.fail("GET /healthz got no answer while clients stalled every thread")
        took = time.monotonic() - started
        assert resp.status_code == 200
        assert took < HEADER_S + 3, took  # the deadline, plus a margin for a busy machine
        for sock in [*stalls, trickled]:
            answer = _answer(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert payload["error"] == "request_timeout"
    finally:
        stop.set()
        feeder.join()
        for sock in [*stalls, trickled]:
            sock.close()


@pytest.mark.timeout(90)
def test_slow_but_steady_upload_is_read_past_the_body_timeout(server: str, api_key: str) -> None:
    """Above the minimum rate, a body may take longer than SEG_REQUEST_BODY_TIMEOUT_SECONDS."""
    head, body = _upload(api_key)
    piece, every = 600, 0.15  # 4000 bytes/s, twice the minimum
    assert len(body) / piece * every > BODY_S * 1.5
    sock = _connect(server, head)
    try:
        for i in range(0, len(body), piece):
            time.sleep(every)
            sock.sendall(body[i : i + piece])
        status = sock.recv(65536).split(b"\r\n", 1)[0]
        assert status == b"HTTP/1.1 202 ACCEPTED", status
    finally:
        sock.close()


@pytest.mark.timeout(90)
def test_body_below_the_minimum_rate_ends_with_408(server: str, api_key: str) -> None:
    head, body = _upload(api_key)
    sock = _connect(server, head)
    try:
        started = time.monotonic()
        for i in range(0, len(body), 100):  # 100 bytes every 0.5 s: 200 bytes/s
            time.sleep(0.5)
            try:
                sock.sendall(body[i : i + 100])
            except OSError:
                break
            if time.monotonic() - started > BODY_S + 10:
                break
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert time.monotonic() - started < BODY_S + 5
    finally:
        sock.close()


@pytest.mark.timeout(60)
def test_clients_that_never_close_do_not_hold_the_accepting_thread(server: str) -> None:
    """gunicorn closed connections on its main thread, waiting up to 2 s for each client's own
    close: 8 clients that sent `Connection: close` and kept their sockets held it 12 s."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    socks = [_connect(server, request) for _ in range(2 * THREADS)]
    try:
        time.sleep(0.3)
        started = time.monotonic()
        assert httpx.get(f"{server}/healthz", timeout=30).status_code == 200
        assert time.monotonic() - started < 3.0
        assert all(_answer(sock).startswith(b"HTTP/1.1 200 ") for sock in socks)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.timeout(60)
def test_idle_keep_alive_connection_is_not_timed(server: str) -> None:
    """Between requests a connection waits in gunicorn's poller, on no thread and no clock."""
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        assert _one_answer(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(HEADER_S + 1)
        sock.sendall(request)  # on the same connection: a closed one answers nothing
        assert _one_answer(sock).startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()


def test_read_clock_budget_grows_with_the_bytes_received() -> None:
    from api.gunicorn_worker import ReadClock, ReadLimits

    limits = ReadLimits(header_s=10.0, body_s=5.0, body_min_rate=1000)
    clock = ReadClock(limits)
    clock.start_headers()
    assert clock.budget() == 10.0
    clock.record(waited=9.0, received=100)
    assert clock.budget() == pytest.approx(1.0)
    clock.start_body()
    assert clock.budget() == 5.0  # each wait: at most the body timeout
    clock.record(waited=4.0, received=3000)  # allowance: 5 s + 3000 bytes / 1000 bytes/s
    assert clock.budget() == pytest.approx(4.0)
    clock.record(waited=4.0, received=0)
    assert clock.budget() == 0.0


@pytest.mark.timeout(120)
def test_clients_that_never_read_a_large_answer_do_not_hold_every_thread(
    server: str, client: Any, api_key: str, settings: Settings
) -> None:
    """Only reads were timed: a client that asked for a large answer (a 2.9 MP overlay, ~8 MB)
    and never read it held its thread for good, and THREADS of them held /healthz too."""
    from segsvc.ml.preprocess import encode_mask_png
    from tests.api.test_jobs import mark_succeeded

    side = 1700
    noise = Image.frombytes("RGB", (side, side), random.randbytes(side * side * 3))
    resp = client.post(
        "/v1/jobs",
        headers={"Authorization": f"Bearer {api_key}"},
        data={"image": (io.BytesIO(encode_image(noise, "PNG")), "a.png")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    mark_succeeded(settings, job_id, encode_mask_png(np.zeros((side, side), np.uint8)))
    request = (
        f"GET /v1/jobs/{job_id}/overlay.png HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {api_key}\r\n\r\n"
    ).encode()
    stalled = []
    for _ in range(THREADS):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", _port(server)))
        sock.sendall(request)
        stalled.append(sock)
    try:
        time.sleep(8)  # each overlay drawn (one at a time per key), then its write blocks
        started = time.monotonic()
        try:
            health = httpx.get(f"{server}/healthz", timeout=HEADER_S + BODY_S + 10)
        except httpx.TimeoutException:
            pytest.fail(f"/healthz: no answer in {time.monotonic() - started:.0f} s")
        assert health.status_code == 200
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.timeout(60)
def test_a_front_ends_x_forwarded_ssl_beside_the_proxys_scheme_is_not_a_400(
    settings: Settings, tmp_path: Path
) -> None:
    """Behind the compose nginx (which sets X-Forwarded-Proto, gunicorn trusting every peer),
    a TLS front end that also sends X-Forwarded-Ssl (nginx-proxy does) got every request a
    400, "Contradictory scheme headers": only X-Forwarded-Proto is read now."""
    with gunicorn(settings, tmp_path, FORWARDED_ALLOW_IPS="*") as base:
        for header in ({"X-Forwarded-Ssl": "on"}, {"X-Forwarded-Protocol": "ssl"}):
            resp = httpx.get(f"{base}/healthz", headers={"X-Forwarded-Proto": "http", **header})
            assert resp.status_code == 200, (header, resp.status_code, resp.text)
