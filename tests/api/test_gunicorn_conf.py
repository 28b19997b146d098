"""api/gunicorn_conf.py: the API steps back on the CPU so the model gets it first, and its
long polls answer at once when it is told to stop."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from segsvc.db import session_scope
from segsvc.models import Job
from segsvc.settings import Settings
from tests.conftest import free_port, stop_process, wait_http_up, worker_env

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import os
from api.gunicorn_conf import yield_cpu
yield_cpu({nice})
group = "-"  # no autogroups, or the root one (init's session), which reads as empty
if os.path.exists("/proc/self/autogroup"):
    group = (open("/proc/self/autogroup").read().split() or ["-"])[-1]
read, write = os.pipe()
if os.fork() == 0:  # as gunicorn forks its workers
    os.write(write, str(os.nice(0)).encode())
    os._exit(0)
os.wait()
print(os.nice(0), group, os.read(read, 16).decode())
"""


def probe(nice: int, *, own_session: bool) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(nice=nice)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        start_new_session=own_session,
        timeout=60,
    ).stdout
    return out.split()


def test_api_runs_at_the_configured_niceness_and_so_do_its_forks() -> None:
    nice, group, after_fork = probe(7, own_session=False)
    assert nice == "7"
    assert after_fork == "7"
    assert group != "7"  # a process in someone else's session leaves that group alone


def test_api_leading_its_own_session_lowers_its_autogroup() -> None:
    if not Path("/proc/self/autogroup").exists():
        pytest.skip("this kernel has no autogroups")
    nice, group, _ = probe(7, own_session=True)
    assert (nice, group) == ("7", "7")


def test_zero_leaves_the_priority_alone() -> None:
    nice, _, _ = probe(0, own_session=True)
    assert nice == "0"


@pytest.mark.timeout(120)
def test_sigterm_answers_a_waiting_submit_with_its_202_before_the_server_stops(
    settings: Settings, api_key: str, tmp_path: Path
) -> None:
    """A deploy stops the API while a `POST /v1/jobs?wait=` waits for a job it has stored: the
    client gets its 202 (and the job's id) at once, not a dropped connection at
    `graceful_timeout` that it would answer by submitting the job again."""
    port, log_path = free_port(), tmp_path / "gunicorn.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    server = ["gunicorn", "-c", "python:api.gunicorn_conf", "api.wsgi:app"]
    proc = subprocess.Popen(
        [sys.executable, "-m", *server, "--bind", f"127.0.0.1:{port}", "--workers", "1"],
        cwd=ROOT,
        env=worker_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base, answers = f"http://127.0.0.1:{port}", []
    png = io.BytesIO()
    Image.new("RGB", (32, 24)).save(png, format="PNG")

    def submit() -> None:  # no inference worker runs: the job stays queued
        with httpx.Client(base_url=base, timeout=60) as http:
            resp = http.post(
                "/v1/jobs?wait=25",
                headers={"Authorization": f"Bearer {api_key}"},
                files={"image": ("a.png", png.getvalue(), "image/png")},
            )
        answers.append((resp.status_code, resp.json(), time.monotonic()))

    try:
        wait_http_up(base, proc, log_path)
        client = threading.Thread(target=submit)
        client.start()
        deadline = time.monotonic() + 20
        while stored_jobs(settings) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the submit is waiting now
        stopped_at = time.monotonic()
        proc.terminate()  # SIGTERM to the master, which sends it on to its worker
        client.join(30)
        proc.wait(30)
    finally:
        stop_process(proc)
        log.close()
    assert answers, log_path.read_text()[-3000:]
    status, body, answered_at = answers[0]
    assert (status, body["status"]) == (202, "queued")
    assert answered_at - stopped_at < 5  # gunicorn would cut it off at 10 s (graceful_timeout)
    assert stored_jobs(settings) == 1


def stored_jobs(settings: Settings) -> Any:
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize(
    ("binds", "port", "expected"),
    [
        (["0.0.0.0:8000"], 0, ["0.0.0.0:8000"]),
        (["0.0.0.0:8000"], 9100, ["0.0.0.0:8000", "0.0.0.0:9100"]),
        (["127.0.0.1:8000"], 9100, ["127.0.0.1:8000", "127.0.0.1:9100"]),
        (["[::1]:8000"], 9100, ["[::1]:8000", "[::1]:9100"]),
        (["127.0.0.1:8000", "127.0.0.1:9100"], 9100, ["127.0.0.1:8000", "127.0.0.1:9100"]),
        (["unix:/run/api.sock"], 9100, ["unix:/run/api.sock", "0.0.0.0:9100"]),
    ],
)
def test_with_metrics_port_listens_on_the_first_address_host(
    binds: list[str], port: int, expected: list[str], tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Importing the config sets PROMETHEUS_MULTIPROC_DIR unless it is set: set here, it goes
    # again after the test, or this process's later metrics tests would read multiprocess files.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from api.gunicorn_conf import with_metrics_port

    assert with_metrics_port(binds, port) == expected


@pytest.mark.timeout(120)
def test_metrics_answer_on_their_own_port_only(
    settings: Settings, api_key: str, tmp_path: Path
) -> None:
    """With SEG_METRICS_PORT set (compose and k8s set 9100), the API's public port answers
    /metrics with a 404, as it would any unknown path, and the metrics port answers nothing but
    /metrics: a published API port no longer shows every caller the service's traffic and
    error counts. Both ports stay through a reload (SIGHUP): the metrics port, once added only
    at start, made the reload see a new address and the server stopped.

    And no control socket: gunicorn 25.1+ opened ~/.gunicorn/gunicorn.ctl by default, one path
    for every gunicorn of the user (`make run`, the tests' servers, both sides of `make
    bench-ab`: each start took it from the last), taking worker and shutdown commands."""
    port, metrics_port, log_path = free_port(), free_port(), tmp_path / "gunicorn.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    server = ["gunicorn", "-c", "python:api.gunicorn_conf", "api.wsgi:app"]
    env = worker_env(
        settings,
        SEG_METRICS_PORT=str(metrics_port),
        GUNICORN_BIND=f"127.0.0.1:{port}",
        HOME=str(tmp_path / "home"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", *server, "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    public, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
    answers: list[dict[str, int]] = []
    try:
        wait_http_up(public, proc, log_path)
        for reload in (False, True):
            if reload:
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 60
                while log_path.read_bytes().count(b"Booting worker") < 2:  # the new worker
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                    time.sleep(0.1)
                wait_http_up(public, proc, log_path)
            with httpx.Client(timeout=30) as http:
                answers.append(
                    {
                        "scraped": http.get(f"{metrics}/metrics").status_code,
                        "from_outside": http.get(f"{public}/metrics").status_code,
                        "health_on_metrics": http.get(f"{metrics}/healthz").status_code,
                        "api_on_metrics": http.get(
                            f"{metrics}/v1/jobs?ids=",
                            headers={"Authorization": f"Bearer {api_key}"},
                        ).status_code,
                        "health": http.get(f"{public}/healthz").status_code,
                        # The Host header names no port the server listens on.
                        "spoofed_host": http.get(
                            f"{public}/metrics", headers={"Host": f"api:{metrics_port}"}
                        ).status_code,
                    }
                )
    finally:
        stop_process(proc)
        log.close()
    expected = {
        "scraped": 200,
        "from_outside": 404,
        "health_on_metrics": 404,
        "api_on_metrics": 404,
        "health": 200,
        "spoofed_host": 404,
    }
    assert answers == [expected, expected], log_path.read_text()[-3000:]
    assert not (tmp_path / "home" / ".gunicorn").exists()
    assert "Control socket" not in log_path.read_text()


def test_a_unix_socket_bind_shows_no_metrics_to_a_host_header_naming_the_metrics_port(
    settings: Settings, tmp_path: Path
) -> None:
    """On a unix socket gunicorn takes SERVER_PORT from the Host header: `Host: api:9100` on
    the public socket (behind a proxy passing the client's Host) read every metric."""
    metrics_port, log_path = free_port(), tmp_path / "gunicorn.log"
    sock = tmp_path / "api.sock"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    env = worker_env(settings, SEG_METRICS_PORT=str(metrics_port), GUNICORN_BIND=f"unix:{sock}")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:api.gunicorn_conf",
            "api.wsgi:app",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http_up(f"http://127.0.0.1:{metrics_port}", proc, log_path, path="/metrics")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=30) as http:
            spoofed = http.get(
                "http://api/metrics", headers={"Host": f"api:{metrics_port}"}
            ).status_code
            health = http.get("http://api/healthz").status_code
    finally:
        stop_process(proc)
        log.close()
    assert (spoofed, health) == (404, 200), log_path.read_text()[-3000:]


@pytest.mark.parametrize(
    ("status", "reason", "mesg", "want"),
    [
        (400, "Bad Request", "Invalid HTTP header name: 'Bad Header'", "bad_request"),
        (417, "Expectation Failed", "Unable to comply with expectation: 'x'", "expectation_failed"),
        (500, "Internal Server Error", "", "internal_error"),
    ],
)
def test_gunicorn_error_pages_are_json(  # type: ignore[no-untyped-def]
    status: int, reason: str, mesg: str, want: str, tmp_path: Path, monkeypatch
) -> None:
    """What gunicorn answers itself (`util.write_error`) is JSON like the app's errors, and a
    500 of its own shows nothing of what failed."""
    import gunicorn.util

    # Importing the config sets PROMETHEUS_MULTIPROC_DIR unless it is set: set here, it goes
    # again after the test, or this process's later metrics tests would read multiprocess files.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from api.gunicorn_conf import write_json_error

    assert gunicorn.util.write_error is write_json_error  # installed as the config loads
    ours, theirs = socket.socketpair()
    with ours, theirs:
        write_json_error(ours, status, reason, mesg)
        ours.shutdown(socket.SHUT_WR)
        answer = theirs.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == f"HTTP/1.1 {status} {reason}"
    assert {"Connection: close", "Content-Type: application/json"} <= set(lines[1:])
    assert f"Content-Length: {len(body)}" in lines
    error = json.loads(body)
    assert error["error"] == want
    assert error["message"] == (mesg or "Something went wrong on our side.")
