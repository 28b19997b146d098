"""`segsvc run` (`make run`): migrate, bootstrap, then API and workers in the foreground."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click

from segsvc.migrate import upgrade
from segsvc.services.bootstrap import ensure_local_key, ensure_production_model
from segsvc.settings import ROOT, Settings, get_settings


def process_commands(settings: Settings, *, api_workers: int) -> dict[str, list[str]]:
    """The processes of a one-machine deployment."""
    py = sys.executable
    celery = [py, "-m", "celery", "-A", "worker.celery_app"]
    return {
        "api": [
            py,
            "-m",
            "gunicorn",
            "api.wsgi:app",
            "--bind",
            f"127.0.0.1:{settings.port}",
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


@click.command("run")
@click.option("--api-workers", default=2, show_default=True)
def run(api_workers: int) -> None:
    """Run the whole service in the foreground; Ctrl-C stops it cleanly."""
    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings=settings)
    version, _ = ensure_production_model(settings)
    click.echo(f"serving model {version}")
    if settings.auth_required:
        key = ensure_local_key(settings)
        click.echo(f"local API key (also in {settings.var_dir / 'local_api_key'}):\n  {key}")
    click.echo(f"API on http://127.0.0.1:{settings.port}")
    procs = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy())  # noqa: S603
        for name, cmd in process_commands(settings, api_workers=api_workers).items()
    }
    sys.exit(_supervise(procs))


def _supervise(procs: dict[str, subprocess.Popen[bytes]]) -> int:
    """Run until Ctrl-C or SIGTERM (0), or until a process exits by itself (1: the API could
    not bind its port, a worker crashed), then stop the others."""
    stopping, failed = False, False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
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
