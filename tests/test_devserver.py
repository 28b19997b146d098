"""Smoke test of `make run`'s path: the embedded default (SQLite + SQLAlchemy transport)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, sample_images

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive loopback ports nothing listens on now."""
    for _ in range(50):
        base = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise AssertionError(f"no {count} consecutive free ports")


def test_embedded_default_runs_one_job(tmp_path: Path) -> None:
    """...with SEG_METRICS_PORT set: every process served /metrics on that one port (the
    API's --bind dropped it, and the first worker to bind it won), now each on its own."""
    port, metrics = free_port(), free_port_run(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    env.update(
        SEG_VAR_DIR=str(tmp_path / "var"),
        SEG_PORT=str(port),
        SEG_METRICS_PORT=str(metrics),
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    log = tmp_path / "run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segsvc.cli", "run", "--api-workers", "1"],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        key = _wait_ready(port, tmp_path / "var" / "local_api_key", proc, log)
        photo = sample_images(1)[0]
        headers = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{port}"
        resp = httpx.post(
            f"{base}/v1/jobs",
            headers=headers,
            files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
        )
        assert resp.status_code == 202, resp.text
        job_url = resp.headers["Location"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            body = httpx.get(job_url, headers=headers).json()
            if body["status"] == "succeeded":
                break
            time.sleep(0.3)
        assert body["status"] == "succeeded", log.read_text()[-3000:]
        mask = httpx.get(body["urls"]["mask"], headers=headers)
        assert mask.status_code == 200
        assert mask.headers["content-type"] == "image/png"
        api_metrics = httpx.get(f"http://127.0.0.1:{metrics}/metrics")
        assert api_metrics.status_code == 200
        assert "segsvc_submissions_total 1.0" in api_metrics.text
        # The worker counts a job after it stored it and sent its notice: read until it has.
        counted = 'segsvc_jobs_total{status="succeeded"} 1.0'
        deadline = time.monotonic() + 30
        while counted not in httpx.get(f"http://127.0.0.1:{metrics + 1}/metrics").text:
            assert time.monotonic() < deadline, "the worker's /metrics never counted the job"
            time.sleep(0.2)
        # Each process shows its own series: with the API's multiprocess folder the webhook
        # worker's /metrics summed every process's files, the inference worker's jobs too.
        webhook_metrics = httpx.get(f"http://127.0.0.1:{metrics + 2}/metrics")
        assert webhook_metrics.status_code == 200
        assert "segsvc_jobs_total{" not in webhook_metrics.text
        assert "Address already in use" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert "stopped" in log.read_text()


def _wait_ready(port: int, key_file: Path, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if key_file.exists() and b" ready." in log.read_bytes():
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    return key_file.read_text().strip()
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise AssertionError(log.read_text()[-3000:])


def test_run_exits_non_zero_when_a_process_dies_by_itself() -> None:
    """`segsvc run` exited 0 when, say, the API could not bind its port and stopped."""
    import signal
    import subprocess
    import sys

    from segsvc.devserver import _supervise

    crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    handler = signal.getsignal(signal.SIGINT)
    assert _supervise({"api": crashed, "worker": sleeper}) == 1
    assert sleeper.poll() is not None  # the others were stopped
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is the caller's again


SUPERVISOR = """
import os, sys
from segsvc.devserver import _supervise, start_processes
sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
names = ("api", "worker")
procs = start_processes(dict.fromkeys(names, sleep), dict.fromkeys(names, dict(os.environ)))
print(" ".join(str(p.pid) for p in procs.values()), flush=True)
sys.exit(_supervise(procs))
"""


def _start_supervisor() -> tuple[subprocess.Popen[str], list[int]]:
    """The supervisor of two sleepers, once it catches the stop signals; their pids."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    pids = [int(pid) for pid in proc.stdout.readline().split()]
    deadline = time.monotonic() + 30
    while not all(_catches(proc.pid, sig) for sig in (signal.SIGHUP, signal.SIGTERM)):
        assert time.monotonic() < deadline, "the supervisor never took its signals"
        time.sleep(0.02)
    return proc, pids


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            with contextlib.suppress(ChildProcessError):  # not ours: nothing to reap
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
                state = Path(f"/proc/{pid}/stat").read_text().split()[2]
                if state != "Z":
                    alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_the_supervisor_stops_its_processes_when_its_terminal_closes(sig: int) -> None:
    """A closed terminal (SIGHUP) killed the supervisor without stopping the others, and
    gunicorn, which takes SIGHUP for a reload, kept the port from the next `make run`."""
    proc, pids = _start_supervisor()
    try:
        for pid in pids:  # in sessions of their own: the terminal's signals are not theirs
            assert os.getsid(pid) == pid
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
        assert _gone(pids)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_processes_stop_when_the_supervisor_is_killed() -> None:
    """SIGKILL (or the OOM killer) leaves the supervisor no chance to stop the others: the
    kernel sends them SIGTERM instead (PR_SET_PDEATHSIG)."""
    proc, pids = _start_supervisor()
    try:
        proc.kill()
        proc.wait(timeout=30)
        assert _gone(pids)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_local_key_is_shown_once_when_it_is_made(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every `make run` printed the admin secret, into whatever log its output went to."""
    from segsvc.devserver import local_key_message

    cfg = settings.model_copy(update={"var_dir": tmp_path / "var"})
    first = local_key_message(cfg)
    key = (tmp_path / "var" / "local_api_key").read_text().strip()
    assert key in first
    again = local_key_message(cfg)
    assert key not in again
    assert str(tmp_path / "var" / "local_api_key") in again


def run_command(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`segsvc run` with the embedded default under `tmp_path/var`; stopped after 60 s."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    full.update(SEG_VAR_DIR=str(tmp_path / "var"), **env)
    return subprocess.run(
        [sys.executable, "-m", "segsvc.cli", "run"],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_run_on_the_same_var_dir_is_refused_at_once(tmp_path: Path) -> None:
    """`make run` in two terminals: the second started a second beat and more reconcilers on
    the same database and broker, and emptied the first one's metrics folder for good."""
    from segsvc.devserver import RUN_LOCK
    from segsvc.files import try_lock

    var = tmp_path / "var"
    var.mkdir()
    (var / RUN_LOCK).write_text("4242\n")
    with try_lock(var / RUN_LOCK) as held:  # the first run
        assert held
        started = time.monotonic()
        done = run_command(tmp_path, SEG_PORT=str(free_port()))
    assert done.returncode == 1
    assert "another `segsvc run` is using" in done.stderr
    assert "pid 4242" in done.stderr
    assert time.monotonic() - started < 20  # no migration, no process started
    assert not (var / "segsvc.db").exists()


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """The API's bind failed 17 s in, after migrations and every worker, in a log line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_command(tmp_path, SEG_PORT=str(port))
    assert done.returncode == 1
    assert f"the API's port {port} on 127.0.0.1 is in use" in done.stderr
    assert "API on" not in done.stdout
    assert not (tmp_path / "var" / "segsvc.db").exists()
