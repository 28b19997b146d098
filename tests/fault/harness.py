"""Real processes for the fault tests: our own Redis and Postgres servers (never the shared
ones), workers, beat, load, and the final count of what happened to every job."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import redis
from sqlalchemy import select

from segsvc.db import session_scope
from segsvc.models import Job
from segsvc.settings import Settings
from tests.conftest import (
    ROOT,
    free_port,
    sample_images,
    start_worker,
    stop_process,
    worker_env,
)

INJECT = Path(__file__).resolve().parent / "inject"


def postgres_bin(lib: Path = Path("/usr/lib/postgresql")) -> Path:
    """The newest installed PostgreSQL's programs (initdb, pg_ctl), as scripts/ensure-services.sh
    picks the version it runs: Debian 12 ships 15, Debian 13 ships 17."""
    versions = [d for d in lib.glob("*/bin") if d.parent.name.isdigit() and (d / "initdb").exists()]
    if not versions:
        raise FileNotFoundError(f"no PostgreSQL with initdb under {lib}")
    return max(versions, key=lambda d: int(d.parent.name))


PG_BIN = postgres_bin()
# Fast recovery for tests: reconcile every second, leases far shorter than in production.
FAST = {
    "SEG_RECONCILE_INTERVAL_SECONDS": "1",
    "SEG_JOB_LEASE_SECONDS": "6",
    "SEG_BATCH_MAX_SIZE": "8",
}


def fast_settings(settings: Settings, **update: object) -> Settings:
    """The settings the API side of a fault test uses (matching FAST)."""
    return settings.model_copy(
        update={
            "reconcile_interval_seconds": 1.0,
            "job_lease_seconds": 6,
            "batch_max_size": 8,
            **update,
        }
    )


class OwnRedis:
    """A throwaway redis-server on a spare loopback port (no persistence: a restart empties it)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _pings(self.url), 10, "own redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


class OwnPostgres:
    """A throwaway Postgres cluster (initdb) on a spare port, in its own temporary folder (as
    root, initdb runs as `postgres`, who cannot enter pytest's private tmp folders)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="segsvc-fault-pg-"))
        self.data = self.base / "pgdata"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_postgres:
            shutil.chown(self.base, "postgres")
        subprocess.run(
            [
                *self._as_postgres,
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [
                *self._as_postgres,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                str(self.data / "log"),
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            [
                *self._as_postgres,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            check=False,
            capture_output=True,
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class Processes:
    """Workers and one beat for a test; everything is stopped at the end."""

    def __init__(self, settings: Settings, tmp: Path, **env: str) -> None:
        self.settings, self.tmp, self.env = settings, tmp, {**FAST, **env}
        self.workers: list[subprocess.Popen[bytes]] = []
        self.beat: subprocess.Popen[bytes] | None = None
        self.started = 0

    def start_worker(self) -> subprocess.Popen[bytes]:
        self.started += 1
        proc = start_worker(self.settings, self.tmp / f"worker-{self.started}.log", **self.env)
        self.workers.append(proc)
        return proc

    def start_beat(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "beat",
            "-s",
            str(self.tmp / "beat-schedule"),
            "--loglevel",
            "INFO",
        ]
        log = open(self.tmp / "beat.log", "wb")  # noqa: SIM115 - closed with the process
        self.beat = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=worker_env(self.settings, **self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def logs(self, tail: int | None = 3000) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-(tail or 0) :] for p in sorted(self.tmp.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in [*self.workers, *([self.beat] if self.beat else [])]:
            stop_process(proc)


def wait_until(predicate, timeout: float, message: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(message)


def photos(n: int) -> list[bytes]:
    """`n` real pet photos (cycled from the shared sample)."""
    files = sample_images(min(n, 12))
    return [files[i % len(files)].read_bytes() for i in range(n)]


def submit(client, auth: dict[str, str], data: bytes):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/jobs",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(data), "pet.jpg")},
    )


def statuses(settings: Settings, ids: Iterable[str]) -> dict[str, tuple[str, int, str | None]]:
    """id -> (status, attempts, error code)."""
    wanted = [uuid.UUID(i) for i in ids]
    with session_scope(settings) as session:
        rows = session.execute(
            select(Job.id, Job.status, Job.attempts, Job.error_code).where(Job.id.in_(wanted))
        ).all()
    return {str(r[0]): (r[1], r[2], r[3]) for r in rows}


def wait_terminal(
    settings: Settings, ids: list[str], timeout: float
) -> dict[str, tuple[str, int, str | None]]:
    """Wait until every job is finished (or the time is up); returns their final state."""
    deadline = time.monotonic() + timeout
    while True:
        state = statuses(settings, ids)
        done = all(s[0] in ("succeeded", "failed", "canceled") for s in state.values())
        if (done and len(state) == len(ids)) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def report(
    name: str, ids: list[str], state: dict[str, tuple[str, int, str | None]]
) -> Counter[str]:
    """Print and return the counts every fault test ends with."""
    counts: Counter[str] = Counter(s[0] for s in state.values())
    lost = len(ids) - counts["succeeded"] - counts["failed"] - counts["canceled"]
    attempts = Counter(s[1] for s in state.values())
    print(
        f"\n[{name}] submitted={len(ids)} succeeded={counts['succeeded']} "
        f"failed={counts['failed']} lost={lost} attempts={dict(sorted(attempts.items()))}"
    )
    counts["lost"] = lost
    return counts
