"""Start and stop the services a benchmark drives, all on loopback with their own database."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import psycopg
import redis

from segsvc.settings import ROOT

PG_ADMIN = os.environ.get("SEG_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SEG_BENCH_REDIS", "redis://127.0.0.1:6379/15")
DB_NAME = "segsvc_bench"
# Same server settings for the API and the hello endpoint (the devserver's: 2 workers x 12).
GUNICORN = ["--workers", "2", "--threads", "12", "--config", "python:api.gunicorn_conf"]


def fresh_database(name: str = DB_NAME, redis_url: str = REDIS_URL) -> str:
    """Drop and create a benchmark's own database (and empty its Redis DB); returns its
    SQLAlchemy URL."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    redis.Redis.from_url(redis_url).flushdb()
    return f"{base}/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_env(
    database_url: str, var_dir: Path, redis_url: str = REDIS_URL, **extra: str
) -> dict[str, str]:
    """Environment for service processes: limits off, quiet logs, loopback only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    env.update(
        SEG_DATABASE_URL=database_url,
        SEG_BROKER_URL=redis_url,
        SEG_VAR_DIR=str(var_dir),
        SEG_RATE_LIMIT_PER_MINUTE="100000000",
        SEG_RATE_LIMIT_BURST="100000000",
        SEG_MAX_QUEUE_DEPTH="1000000",
        SEG_LOG_LEVEL="INFO",
        SEG_LOG_FORMAT="text",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class Service:
    """One child process with its log file, running the code of `cwd` (a checkout: this one,
    or the other side of `bench.ab`) from its log folder: the settings read a `.env` from the
    working directory, and one in the checkout (README: `cp .env.example .env`) would change
    the system measured but not the references timed beside it."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        path = os.pathsep.join(p for p in (str(cwd), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            cmd,
            cwd=log_dir,
            env={**env, "PYTHONPATH": path},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")

    def pids(self) -> list[int]:
        """The service's process and its direct children, as they are now."""
        return [self.proc.pid, *children(self.proc.pid)]

    def peak_rss_mb(self) -> dict[str, float]:
        """VmHWM of the process and each of its children, in MB."""
        out = {}
        for pid in self.pids():
            with suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out[str(pid)] = int(line.split()[1]) / 1024.0
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def gunicorn(
    name: str,
    app: str,
    port: int,
    env: dict[str, str],
    log_dir: Path,
    args: list[str],
    cwd: Path = ROOT,
) -> Service:
    cmd = [sys.executable, "-m", "gunicorn", app, *args, "--bind", f"127.0.0.1:{port}"]
    service = Service(name, cmd, env, log_dir, cwd)
    try:
        wait_http(service, port)
    except BaseException:  # a timeout or Ctrl-C while it starts: leave nothing running
        service.stop()
        raise
    return service


def worker(
    env: dict[str, str], log_dir: Path, probe_dir: Path, cwd: Path = ROOT, name: str = "worker"
) -> Service:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        "inference",
        "--pool",
        "solo",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
        "--hostname",
        f"bench-{name}-{os.getpid()}@%h",
    ]
    (probe_dir / "ready").unlink(missing_ok=True)  # a killed worker's would answer at once
    service = Service(name, cmd, {**env, "SEG_PROBE_DIR": str(probe_dir)}, log_dir, cwd)
    deadline = time.monotonic() + 600  # the first start converts the model
    try:
        while (
            not (probe_dir / "ready").exists() and b" ready." not in service.log_path.read_bytes()
        ):
            service.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("worker not ready in time")
            time.sleep(0.2)
    except BaseException:  # a timeout or Ctrl-C while it starts: leave nothing running
        service.stop()
        raise
    return service


def wait_http(service: Service, port: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check_alive()
        with suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            return
        time.sleep(0.2)
    raise RuntimeError(f"{service.name} did not answer on port {port}")


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes and their reaped children have used so far.

    A child that exits inside a run (a Postgres autovacuum worker or backend, a restarted
    gunicorn worker) drops out of the pid list, but its parent's cutime/cstime then holds its
    final CPU; counting only the live processes' own time made such a run's share negative.
    """
    total = 0
    for pid in pids:
        with suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / TICKS_PER_S


def pids_named(prefix: str) -> list[int]:
    """Processes whose command name starts with `prefix` (e.g. every Postgres backend)."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with suppress(OSError):
            if comm.read_text().startswith(prefix):
                found.append(int(comm.parent.name))
    return found


def thread_times(pid: int, prefix: str = "seg-") -> dict[str, tuple[float, float]]:
    """Per OS thread name starting with `prefix` (the worker names its model, claim and store
    threads): seconds on a CPU and seconds runnable but waiting for one, from
    /proc/<pid>/task/<tid>/schedstat (the kernel's per-thread scheduler statistics)."""
    out: dict[str, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        with suppress(OSError, ValueError):
            name = (task / "comm").read_text().strip()
            if not name.startswith(prefix):
                continue
            run_ns, wait_ns, _ = (int(v) for v in (task / "schedstat").read_text().split())
            run, wait = out.get(name, (0.0, 0.0))
            out[name] = (run + run_ns / 1e9, wait + wait_ns / 1e9)
    return out


class ThreadMeter:
    """What the worker's named threads spent over a run: core-ms on a CPU and ms spent
    runnable but waiting for a CPU (another process or thread had it), per job."""

    def __init__(self, worker: Service) -> None:
        self.pid = worker.proc.pid
        self._start: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        self._start = thread_times(self.pid)

    def per_job(self, jobs: int) -> dict[str, dict[str, float]]:
        per, out = 1000.0 / max(jobs, 1), {}
        for name, (run, wait) in sorted(thread_times(self.pid).items()):
            run_before, wait_before = self._start.get(name, (0.0, 0.0))
            out[name] = {"cpu_ms": (run - run_before) * per, "wait_ms": (wait - wait_before) * per}
        return out


class CpuMeter:
    """CPU time per group of processes over a run, reported as core-ms per job.

    The load generator is this process (its client threads are all that run during a load).
    Postgres and Redis count all their processes: on this machine nothing else uses them.
    """

    def __init__(self, services: dict[str, Service]) -> None:
        self.groups: dict[str, Callable[[], list[int]]] = {
            name: svc.pids for name, svc in services.items()
        }
        self.groups["postgres"] = lambda: pids_named("postgres")
        self.groups["redis"] = lambda: pids_named("redis-server")
        self._start: dict[str, float] = {}
        self._machine = (0.0, 0.0)

    def _now(self) -> dict[str, float]:
        now = {name: cpu_seconds(pids()) for name, pids in self.groups.items()}
        mine = os.times()
        now["load generator"] = mine.user + mine.system
        return now

    def start(self) -> None:
        self._start = self._now()
        self._machine = machine_cpu_seconds()

    def per_job(self, jobs: int) -> dict[str, float]:
        """Core-ms per job of each group and their `total`; besides, `other`: what the rest of
        this machine ran meanwhile (processes outside the groups, the kernel's own threads),
        and `steal`: time the hypervisor gave this VM's CPUs to someone else while they had
        work. Neither is in `total`; either, when large, says the run was disturbed."""
        end, machine = self._now(), machine_cpu_seconds()
        per = 1000.0 / max(jobs, 1)
        out = {k: (end[k] - self._start[k]) * per for k in end}
        out["total"] = sum(out.values())
        busy, steal = (machine[i] - self._machine[i] for i in (0, 1))
        out["other"] = max(0.0, busy * per - out["total"])
        out["steal"] = steal * per
        return out


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat's `cpu` line:
    busy is user + nice + system + irq + softirq (guest time is inside user)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system_, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system_ + irq + softirq) / TICKS_PER_S, steal / TICKS_PER_S


def metered(services: dict[str, Service], run: Any) -> dict[str, Any]:
    """A load run's summary plus the CPU each process group spent per job (and, with a worker,
    what its model, claim and store threads spent, on a CPU and waiting for one)."""
    meter = CpuMeter(services)
    threads = ThreadMeter(services["worker"]) if "worker" in services else None
    meter.start()
    if threads:
        threads.start()
    summary: dict[str, Any] = run().summary()
    summary["cpu_ms_per_job"] = meter.per_job(summary["jobs"])
    if threads:
        summary["worker_threads_per_job"] = threads.per_job(summary["jobs"])
    return summary
