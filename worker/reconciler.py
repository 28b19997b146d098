"""The reconciler: a pass when each worker (inference or maintenance) starts and then every
`reconcile_interval_seconds` from a thread of the worker itself; beat sends none. A Redis key
lets one pass start per interval across all of them, and Postgres' advisory lock keeps passes
from overlapping. The task `segsvc.reconcile` remains for sending a pass by hand."""

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


TURN_KEY = "segsvc:reconcile:turn"


def take_turn(cfg: Settings) -> bool:
    """True when no pass started within the last interval, so the caller runs one.

    A Redis key that expires a little before the interval ends marks the turn taken; without
    Redis, or with Redis down, every caller runs (the advisory lock still keeps passes apart,
    and a pass that finds nothing to do is cheap).
    """
    url = cfg.effective_redis_url
    if not url:
        return True
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        ttl_ms = max(1, int(cfg.reconcile_interval_seconds * 900))  # 0.9 of the interval
        return bool(client.set(TURN_KEY, "1", nx=True, px=ttl_ms))
    except redis.RedisError:
        return True
    finally:
        client.close()


@app.task(name=RECONCILE, ignore_result=True)
def reconcile_task() -> dict[str, object]:
    """A pass sent by hand, unless a worker's own loop ran one within the interval."""
    if not take_turn(settings):
        return {"skipped": True}
    return run_reconcile(settings, app)


def reconcile_periodically(
    cfg: Settings, celery_app: Celery, stop: threading.Event | None = None
) -> threading.Thread:
    """Run a pass now (a restarted worker recovers at once), then one every interval.

    This runs in a thread of each worker, not through the queue: a message on the inference
    queue would wait behind the backlog, and behind one longer than the interval every such
    message would expire before a worker took it, which is when a crashed worker's jobs most
    need re-sending (and a periodic message there would keep waking workers scaled to zero).
    All workers tick; `take_turn` lets one of them run.
    """
    stop = stop or threading.Event()

    def loop() -> None:
        first = True
        while not stop.is_set():
            try:
                if take_turn(cfg) or first:
                    run_reconcile(cfg, celery_app)
            except Exception:  # the next tick tries again
                log.warning("reconcile pass failed", exc_info=True)
            first = False
            stop.wait(cfg.reconcile_interval_seconds)

    thread = threading.Thread(target=loop, name="seg-reconcile", daemon=True)
    thread.start()
    return thread


@click.command("reconcile")
def reconcile_command() -> None:
    """Run one reconciliation pass now and print what it did."""
    click.echo(run_reconcile(settings, app))
