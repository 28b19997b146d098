"""The reconciler task `segsvc.reconcile`: run by beat every `reconcile_interval_seconds` and
once when a worker starts; Postgres' advisory lock keeps it to one pass at a time."""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any

import click
from celery import Celery

from segsvc.db import session_scope
from segsvc.queue import RECONCILE, enqueue_job
from segsvc.services import reconcile
from segsvc.settings import Settings
from worker.celery_app import app, settings

log = logging.getLogger(__name__)


def broker_snapshot(cfg: Settings) -> set[str] | None:
    """Job ids with a live message in Redis; None when the broker is not Redis."""
    url = cfg.celery_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        return reconcile.broker_job_ids(
            client, queue=cfg.queue_name, stale_after_s=cfg.job_lease_seconds
        )
    finally:
        client.close()


def run_reconcile(cfg: Settings, celery_app: Celery) -> dict[str, object]:
    """One reconciliation pass (skipped when another reconciler holds the lock)."""
    with session_scope(cfg) as session:
        if not reconcile.try_lock(session=session):
            return {"skipped": True}
        # Snapshot after taking the lock and reading nothing yet: a job enqueued between the
        # snapshot and the query is at worst sent twice, which the claim fence makes harmless.
        present = broker_snapshot(cfg)
        report = reconcile.reconcile(
            session=session,
            settings=cfg,
            present=present,
            enqueue=partial(_send, celery_app, cfg),
        )
    counts = report.as_dict()
    if any(v for k, v in counts.items() if k != "skipped"):
        log.warning("reconciler: %s (failed: %s)", counts, report.failed_ids[:20])
    return counts


def _send(celery_app: Celery, cfg: Settings, job_id: Any) -> None:
    enqueue_job(celery_app, job_id, settings=cfg)


@app.task(name=RECONCILE, ignore_result=True)
def reconcile_task() -> dict[str, object]:
    """Periodic pass (beat)."""
    return run_reconcile(settings, app)


def reconcile_at_start() -> None:
    """Run one pass in the background when a worker starts, so a restart recovers at once."""

    def run() -> None:
        try:
            run_reconcile(settings, app)
        except Exception:  # the periodic pass will try again
            log.warning("reconcile at worker start failed", exc_info=True)

    threading.Thread(target=run, name="reconcile-at-start", daemon=True).start()


@click.command("reconcile")
def reconcile_command() -> None:
    """Run one reconciliation pass now and print what it did."""
    click.echo(run_reconcile(settings, app))
