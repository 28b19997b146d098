"""The workers' and beat's /metrics server, the queue-depth sampler and the model gauges.

Workers run the solo pool (one process per container), so the default registry is the whole
story; if `PROMETHEUS_MULTIPROC_DIR` is set (a prefork pool), the server aggregates its files.
Each process serves the families of its role only (`only`: INFERENCE_SERIES, BEAT_SERIES...).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from prometheus_client import start_http_server
from sqlalchemy import func, select

from segsvc.db import session_scope
from segsvc.metrics import (
    BROKER_QUEUE_LENGTH,
    JOB_STATES,
    JOBS_IN_STATE,
    MODEL_INFO,
    MODEL_LOAD_TIME,
    PREDICT_TIME,
    QUEUE_DEPTH,
    RETRAIN_LAST_SUCCESS,
    RETRAIN_SUCCESS,
    WEBHOOK_PENDING,
    metrics_registry,
)
from segsvc.models import Job, TrainingRun, WebhookMessage
from segsvc.settings import Settings, get_settings, is_redis_url
from segsvc.webhooks import outbox

log = logging.getLogger(__name__)

_started: dict[int, object] = {}


def start_metrics_server(
    port: int, addr: str | None = None, *, only: frozenset[str] | None = None
) -> bool:
    """Serve /metrics on `addr:port` (addr: SEG_METRICS_BIND unless given) in a daemon thread,
    once per process; False when port is 0. `only`: the families this process's role records
    (`segsvc.metrics.metrics_registry`), the others left out."""
    if port <= 0:
        return False
    if port not in _started:
        host = get_settings().metrics_bind if addr is None else addr
        registry = metrics_registry(only=only)
        _started[port] = start_http_server(port, addr=host, registry=registry)
        log.info("metrics on %s:%d/metrics", host, port)
    return True


@dataclass(frozen=True)
class ServedModel:
    """A version a worker serves, as its series name it."""

    version: str
    sha256: str
    runtime: str
    load_seconds: float


def record_models(
    production: ServedModel, canary: ServedModel | None = None, *, dropped: Iterable[str] = ()
) -> None:
    """Publish the versions in service (the model manager calls this on each switch of its
    routing table) and each one's load time; `dropped`: versions no longer served, whose
    series go, load time and forward-pass histogram (one series per version ever served grew
    the worker's memory and /metrics with every retraining that reached it)."""
    MODEL_INFO.info(
        {
            "production": production.version,
            "sha256": production.sha256[:12],
            "runtime": production.runtime,
            "canary": canary.version if canary is not None else "",
            "canary_runtime": canary.runtime if canary is not None else "",
        }
    )
    served = {production.version: production}
    if canary is not None:
        served[canary.version] = canary
    for version in dropped:
        if version not in served:
            for series in (MODEL_LOAD_TIME, PREDICT_TIME):
                with contextlib.suppress(KeyError):  # never published (no batch ran on it)
                    series.remove(version)
    for model in served.values():
        MODEL_LOAD_TIME.labels(model.version).set(model.load_seconds)


def sample_queue_depth(settings: Settings) -> dict[str, int]:
    """Set the depth gauges from Postgres (queued and running jobs, pending webhook messages)
    and the broker (its lists' lengths, when it is Redis: there are no lists to read
    otherwise).

    The broker's URL, not `effective_redis_url`: that is SEG_REDIS_URL where set (rate limits
    and long-poll notices, perhaps on another database or server), where no message ever is."""
    with session_scope(settings) as session:
        # Both by the index on (status, created_at); the messages by the pending-only index.
        counted = session.execute(
            select(Job.status, func.count()).where(Job.status.in_(JOB_STATES)).group_by(Job.status)
        ).all()
        pending = session.scalar(
            select(func.count())
            .select_from(WebhookMessage)
            .where(WebhookMessage.status == outbox.PENDING)
        )
    in_state = dict.fromkeys(JOB_STATES, 0) | {str(s): int(n) for s, n in counted}
    for state, count in in_state.items():
        JOBS_IN_STATE.labels(state).set(count)
    depth = in_state["queued"]
    QUEUE_DEPTH.set(depth)
    WEBHOOK_PENDING.set(int(pending or 0))
    out = {"queued_jobs": depth}
    url = settings.celery_broker_url
    if is_redis_url(url):
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            for queue in (settings.queue_name, settings.webhook_queue_name):
                length = int(client.llen(queue))
                BROKER_QUEUE_LENGTH.labels(queue).set(length)
                out[queue] = length
        finally:
            client.close()
    return out


def load_retrain_last_success(settings: Settings) -> float | None:
    """Set `segsvc_retrain_last_success_timestamp_seconds` from Postgres (the maintenance
    worker, on start): from 0 after each restart, an alert on its age fired at every deploy
    until the next nightly run. The time, None when no run has succeeded yet."""
    with session_scope(settings) as session:
        ended = session.scalar(
            select(func.max(TrainingRun.completed_at)).where(
                TrainingRun.status.in_(RETRAIN_SUCCESS)
            )
        )
    if ended is None:
        return None
    RETRAIN_LAST_SUCCESS.set(ended.timestamp())
    return ended.timestamp()


class QueueDepthSampler(threading.Thread):
    """Samples the queue depth every `interval` seconds until stopped."""

    def __init__(self, settings: Settings, interval: float = 15.0) -> None:
        super().__init__(name="queue-depth", daemon=True)
        self.settings = settings
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                sample_queue_depth(self.settings)
            except Exception as exc:  # a database or Redis blip must not kill the sampler
                log.warning("queue depth sample failed: %s", exc)
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        """Ask the loop to end."""
        self.stopped.set()
