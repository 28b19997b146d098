"""The webhook worker: its own Celery app on the webhooks queue (no model, no TensorFlow).

Start it with
`celery -A worker.webhook_tasks worker -Q webhooks --pool threads --concurrency 8`.
It never consumes the inference queue (and inference workers never consume this one), so a
slow receiver cannot stall inference. A dispatcher thread polls Postgres for due messages.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

import redis
from celery import Celery, signals
from kombu.entity import Queue

from segsvc.db import session_scope, with_db_role
from segsvc.logging_setup import log_context
from segsvc.metrics import WEBHOOK_DELIVERIES, WEBHOOK_ENDED, WEBHOOK_LATENCY
from segsvc.queue import DELIVER_WEBHOOK, WEBHOOK_APP, make_celery
from segsvc.settings import Settings, get_settings, is_redis_url
from segsvc.webhooks import outbox
from segsvc.webhooks.delivery import deliver
from segsvc.webhooks.dispatch import (
    EXPIRE_CHUNK,
    Ended,
    Prepared,
    claim_due,
    expire_unattempted,
    finish_attempt,
    record_endpoint_outcome,
    start_attempt,
)
from segsvc.webhooks.ssrf import loggable_url
from worker import observability  # noqa: F401  (JSON logs, /metrics, probe files)

log = logging.getLogger(__name__)

POLL_S = 1.0
# Hints waiting in the broker at most. Each claimed message is leased for DISPATCH_LEASE_S: a
# backlog claimed faster than the workers take it went stale in the queue and was claimed and
# sent again every minute, flooding Redis with dead hints that each still cost a transaction.
DISPATCH_HIGH_WATER = 100
# How often a dispatcher ends the messages past their max age that were never attempted, and
# how many chunks of EXPIRE_CHUNK one run ends at most (a dead receiver's backlog).
EXPIRE_EVERY_S = 300.0
EXPIRE_CHUNKS = 20

settings = with_db_role(get_settings(), "worker")  # SEG_WORKER_STATEMENT_TIMEOUT_SECONDS, ...
app = make_celery(settings, name=WEBHOOK_APP)
app.conf.update(
    # Only the webhooks queue by default: started without -Q, this app must not take jobs.
    task_default_queue=settings.webhook_queue_name,
    task_queues=[Queue(settings.webhook_queue_name)],
    worker_prefetch_multiplier=1,  # a slow receiver holds one message, not a handful
)


@app.task(name=DELIVER_WEBHOOK, acks_late=True)
def deliver_webhook(message_id: str, lease: str) -> str:
    """One attempt of a claimed message (a stale or duplicate hint does nothing)."""
    return deliver_message(settings, message_id, datetime.fromisoformat(lease))


def deliver_message(cfg: Settings, message_id: str, lease: datetime) -> str:
    """Prepare and sign in one transaction, POST outside any, record in another. Messages
    that end are counted in `segsvc_webhook_messages_ended_total` once the transaction that
    ended them has committed; the attempt's log lines carry its job's id and the request id of
    the submit that made the job."""
    with session_scope(cfg) as session:
        prepared = start_attempt(session=session, message_id=message_id, lease=lease, settings=cfg)
    if isinstance(prepared, Ended):  # disabled endpoint, or past its max age: no attempt
        WEBHOOK_ENDED.labels(prepared.status).inc()
        with log_context(job_id=prepared.job_id, request_id=prepared.request_id):
            log.info("webhook %s: no attempt -> %s", message_id, prepared.status)
        return prepared.status
    if prepared is None:
        return "skipped"
    with log_context(job_id=prepared.job_id, request_id=prepared.request_id):
        return _attempt(cfg, prepared)


def _attempt(cfg: Settings, prepared: Prepared) -> str:
    """POST the prepared message, then record the attempt and its endpoint's outcome."""
    outcome = deliver(url=prepared.url, body=prepared.body, headers=prepared.headers, settings=cfg)
    WEBHOOK_DELIVERIES.labels(outcome.kind).inc()
    WEBHOOK_LATENCY.observe(outcome.duration_ms / 1000.0)
    with session_scope(cfg) as session:
        status = finish_attempt(session=session, prepared=prepared, outcome=outcome, settings=cfg)
    for ended, count in status.ended.items():  # committed: counted once each
        WEBHOOK_ENDED.labels(ended).inc(count)
    try:  # the endpoint's pause: bookkeeping, after the attempt is safely recorded
        with session_scope(cfg) as session:
            record_endpoint_outcome(
                session=session, prepared=prepared, outcome=outcome, settings=cfg
            )
    except Exception:
        log.warning(
            "could not record webhook endpoint %s's outcome",
            loggable_url(prepared.url),
            exc_info=True,
        )
    log.info(
        "webhook %s: %s (%s) -> %s",
        prepared.message_id,
        outcome.kind,
        outcome.status_code or outcome.error,
        status,
    )
    return str(status)


_redis_clients: dict[str, Any] = {}


def hints_waiting(cfg: Settings) -> int:
    """Delivery hints in the broker's webhooks list (0 without Redis, or when it cannot say:
    the dispatcher then claims as before, and a lost hint only waits for its lease)."""
    url = cfg.celery_broker_url  # the broker's list: not SEG_REDIS_URL's, if that differs
    if not is_redis_url(url):
        return 0
    if url not in _redis_clients:
        _redis_clients[url] = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return int(_redis_clients[url].llen(cfg.webhook_queue_name))
    except redis.RedisError:
        return 0


def dispatch_due(cfg: Settings, sender: Celery) -> int:
    """Claim due messages in Postgres and hand them to the webhooks queue, keeping at most
    DISPATCH_HIGH_WATER hints waiting there (the rest stay due in Postgres until there is
    room, oldest first)."""
    room = DISPATCH_HIGH_WATER - hints_waiting(cfg)
    if room <= 0:
        return 0
    with session_scope(cfg) as session:
        claimed = claim_due(session=session, limit=room)
    for message_id, lease in claimed:
        try:
            sender.send_task(
                DELIVER_WEBHOOK, args=[message_id, lease.isoformat()], queue=cfg.webhook_queue_name
            )
        except Exception:  # the lease runs out and the message is claimed again
            log.warning("could not enqueue webhook %s", message_id, exc_info=True)
    return len(claimed)


def expire_over_age(cfg: Settings, *, chunks: int = EXPIRE_CHUNKS) -> int:
    """Fail the pending messages past their max age that were never attempted, a chunk per
    transaction, up to `chunks` of them (the rest at the next run); counted in
    `segsvc_webhook_messages_ended_total` as they commit."""
    ended = 0
    for _ in range(chunks):
        with session_scope(cfg) as session:
            count = expire_unattempted(session=session, settings=cfg)
        if count:
            WEBHOOK_ENDED.labels(outbox.FAILED).inc(count)
            log.info("webhook messages past their max age, never attempted: %d failed", count)
        ended += count
        if count < EXPIRE_CHUNK:
            break
    return ended


class Dispatcher(threading.Thread):
    """Polls for due messages every second until stopped; every EXPIRE_EVERY_S, ends the
    messages past their max age that were never attempted (`expire_over_age`)."""

    def __init__(self, cfg: Settings, sender: Celery) -> None:
        super().__init__(name="webhook-dispatcher", daemon=True)
        self.cfg, self.sender = cfg, sender
        self.stopping = threading.Event()

    def run(self) -> None:
        next_expiry = time.monotonic()
        while not self.stopping.is_set():
            if time.monotonic() >= next_expiry:  # first: a claim would hand them out as hints
                next_expiry = time.monotonic() + EXPIRE_EVERY_S
                try:
                    expire_over_age(self.cfg)
                except Exception:
                    log.warning("expiring webhook messages failed; next time", exc_info=True)
            try:
                busy = dispatch_due(self.cfg, self.sender) > 0
            except Exception:  # a database blip must not kill the thread
                log.warning("webhook dispatch failed; retrying", exc_info=True)
                busy = False
            self.stopping.wait(0.05 if busy else POLL_S)


_dispatcher: Dispatcher | None = None


@signals.worker_ready.connect
def _start_dispatcher(sender: Any = None, **_: Any) -> None:
    """Run the dispatcher in workers that consume the webhooks queue."""
    global _dispatcher
    worker_app = getattr(sender, "app", None)
    if worker_app is not app or _dispatcher is not None:
        return
    consuming: Any = worker_app.amqp.queues.consume_from or {}
    if settings.webhook_queue_name not in consuming:
        return
    _dispatcher = Dispatcher(settings, app)
    _dispatcher.start()
    log.info("webhook dispatcher started")


@signals.worker_shutdown.connect
def _stop_dispatcher(**_: Any) -> None:
    if _dispatcher is not None:
        _dispatcher.stopping.set()
