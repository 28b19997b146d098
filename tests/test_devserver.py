"""Smoke test of `make run`'s path: the embedded default (SQLite + SQLAlchemy transport)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, sample_images

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_embedded_default_runs_one_job(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    env.update(
        SEG_VAR_DIR=str(tmp_path / "var"),
        SEG_PORT=str(port),
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
