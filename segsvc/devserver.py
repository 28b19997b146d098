"""`segsvc run` (`make run`): migrate, bootstrap, then API and workers in the foreground."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import click

from segsvc.files import try_lock
from segsvc.migrate import upgrade
from segsvc.services.bootstrap import ensure_local_key, ensure_production_model
from segsvc.settings import ROOT, Settings, get_settings

# With SEG_METRICS_PORT set, each process serves /metrics on a port of its own: the API on
# SEG_METRICS_PORT itself (beside its own port), the others on the next ports, in this order
# (all on one port, the first to bind it won and the rest logged errors).
METRICS_PORT_OFFSETS = {"worker": 1, "webhooks": 2, "maintenance": 3, "beat": 4}
LOOPBACK = "127.0.0.1"  # where `segsvc run` serves everything, /metrics included


def metrics_ports(settings: Settings) -> dict[str, int]:
    """Where each process of `segsvc run` serves /metrics (none without SEG_METRICS_PORT)."""
    base = settings.metrics_port
    if not base:
        return {}
    return {"api": base} | {name: base + n for name, n in METRICS_PORT_OFFSETS.items()}


def process_commands(settings: Settings, *, api_workers: int) -> dict[str, list[str]]:
    """The processes of a one-machine deployment."""
    py = sys.executable
    celery = [py, "-m", "celery", "-A", "worker.celery_app"]
    # A --bind replaces gunicorn_conf's listen addresses (its SEG_METRICS_PORT among them).
    binds = [f"{LOOPBACK}:{settings.port}"]
    if settings.metrics_port:
        binds.append(f"{LOOPBACK}:{settings.metrics_port}")
    return {
        "api": [
            py,
            "-m",
            "gunicorn",
            "api.wsgi:app",
            *(arg for bind in binds for arg in ("--bind", bind)),
            "--workers",
            str(api_workers),
            "--threads",
            "12",
            "--config",
            "python:api.gunicorn_conf",
            "--graceful-timeout",
            "10",
        ],
        "worker": [
            *celery,
            "worker",
            "-Q",
            settings.queue_name,
            "--pool",
            "solo",
            "--hostname",
            "inference@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        # Webhook deliveries on their own queue and app: a slow receiver never stalls inference.
        "webhooks": [
            py,
            "-m",
            "celery",
            "-A",
            "worker.webhook_tasks",
            "worker",
            "-Q",
            settings.webhook_queue_name,
            "--pool",
            "threads",
            "--concurrency",
            "8",
            "--hostname",
            "webhooks@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        # Retraining, canary verdicts and retention, apart so training never blocks inference.
        "maintenance": [
            *celery,
            "worker",
            "-Q",
            "maintenance",
            "--pool",
            "threads",  # canary verdicts run while a training run takes the other thread
            "--concurrency",
            "2",
            "--hostname",
            "maintenance@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        # Exactly one beat process sends the periodic tasks of the feedback loop (the workers
        # reconcile from threads of their own).
        "beat": [
            *celery,
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(settings.var_dir / "celerybeat-schedule"),
        ],
    }


def process_envs(
    settings: Settings, env: dict[str, str], names: list[str]
) -> dict[str, dict[str, str]]:
    """Each process's environment: `env` plus its own metrics port, on 127.0.0.1 as the API's
    (the workers' and beat's /metrics listened on every interface, SEG_METRICS_BIND's default
    for containers)."""
    ports = metrics_ports(settings)
    return {
        name: env | {"SEG_METRICS_PORT": str(ports.get(name, 0)), "SEG_METRICS_BIND": LOOPBACK}
        for name in names
    }


@click.command("run")
@click.option("--api-workers", default=2, show_default=True)
def run(api_workers: int) -> None:
    """Run the whole service in the foreground; Ctrl-C stops it cleanly."""
    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    lock = settings.var_dir / RUN_LOCK
    with try_lock(lock) as alone:
        if not alone:
            raise click.ClickException(
                f"another `segsvc run` is using {settings.var_dir} ({_holder(lock)}): stop it "
                "first, or give this one a SEG_VAR_DIR of its own"
            )
        lock.write_text(f"{os.getpid()}\n")
        _run_alone(settings, api_workers)


# Held by the `segsvc run` serving a var_dir: a second one on it (`make run` in two terminals)
# started a second beat and more reconcilers on the same database and broker, and its API's
# start emptied the first one's metrics folder under it (its /metrics blank for good).
RUN_LOCK = "run.lock"


def _holder(lock: Path) -> str:
    try:
        return f"pid {int(lock.read_text().strip())}"
    except (OSError, ValueError):
        return "a process starting"


def _check_port_free(port: int, what: str) -> None:
    """Refuse at once, before anything starts, a port another process listens on (the API's
    bind failed 17 s later, after migrations and every worker, in a log line among theirs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((LOOPBACK, port))
        except OSError as exc:
            raise click.ClickException(
                f"{what} port {port} on {LOOPBACK} is in use ({exc.strerror}): stop what "
                "listens there, or choose another with SEG_PORT / SEG_METRICS_PORT"
            ) from None


def _run_alone(settings: Settings, api_workers: int) -> None:
    """`run`, holding the var_dir's lock."""
    _check_port_free(settings.port, "the API's")
    for name, port in metrics_ports(settings).items():
        if port != settings.port:
            _check_port_free(port, f"{name}'s metrics")
    upgrade(settings=settings)
    version, _ = ensure_production_model(settings)
    click.echo(f"serving model {version}")
    if settings.auth_required:
        click.echo(local_key_message(settings))
    click.echo(f"API on http://127.0.0.1:{settings.port}")
    env = os.environ.copy()
    # gunicorn's metrics files (its workers are processes that one /metrics sums): the API's
    # alone, under var/, cleared at each start. In the Celery processes' environment too, each
    # one's /metrics summed every process's files: every count read 4 times on a dashboard.
    multiproc = env.pop("PROMETHEUS_MULTIPROC_DIR", str(settings.var_dir / "prometheus"))
    ports = metrics_ports(settings)
    if ports:
        click.echo("metrics: " + ", ".join(f"{name} :{port}" for name, port in ports.items()))
    commands = process_commands(settings, api_workers=api_workers)
    envs = process_envs(settings, env, list(commands))
    envs["api"]["PROMETHEUS_MULTIPROC_DIR"] = multiproc
    sys.exit(_supervise(start_processes(commands, envs)))


def local_key_message(settings: Settings) -> str:
    """Make sure the local admin key exists; the line to print about it. The secret itself is
    shown once, when it is made, not into the log of every run."""
    key_file = settings.var_dir / "local_api_key"
    had = key_file.read_text().strip() if key_file.is_file() else None
    key = ensure_local_key(settings)
    if key != had:
        return f"new local admin API key (kept in {key_file}):\n  {key}"
    return f"local admin API key: in {key_file}"


def start_processes(
    commands: dict[str, list[str]], envs: dict[str, dict[str, str]]
) -> dict[str, subprocess.Popen[bytes]]:
    """Start each command, in its environment (`envs`, by name), in a session of its own, to be
    stopped by `_supervise` (or by the kernel when the supervisor dies)."""
    return {
        name: subprocess.Popen(  # noqa: S603
            cmd, cwd=ROOT, env=envs[name], start_new_session=True, preexec_fn=_die_with_parent
        )
        for name, cmd in commands.items()
    }


def _die_with_parent() -> None:
    """In each child, before it runs: SIGTERM when this supervisor dies, however it dies (a
    SIGKILL, the OOM killer), so no orphan keeps the port for the next `make run` (Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    with suppress(OSError, AttributeError):  # not Linux/glibc: the supervisor's signals still do
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _supervise(procs: dict[str, subprocess.Popen[bytes]]) -> int:
    """Run until Ctrl-C, SIGTERM or SIGHUP (0), or until a process exits by itself (1: the API
    could not bind its port, a worker crashed), then stop the others, each with SIGTERM.

    The children run in sessions of their own, so the terminal's signals reach only this
    supervisor: Ctrl-C's SIGINT is a hard stop for gunicorn (its SIGTERM lets requests finish),
    and a closed terminal's SIGHUP made gunicorn reload and outlive the supervisor, which it
    killed, with the port taken for the next `make run`."""
    stopping, failed = False, False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        while not stopping:
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                code = procs[dead[0]].returncode
                click.echo(f"process {dead[0]} exited ({code}); stopping", err=True)
                failed = True
                break
            time.sleep(0.5)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        click.echo("stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0
