"""The workers' and beat's /metrics server, the queue-depth sampler and the model gauges.

Workers run the solo pool (one process per container), so the default registry is the whole
story; if `PROMETHEUS_MULTIPROC_DIR` is set (a prefork pool), the server aggregates its files.
"""

from __future__ import annotations

import logging
import threading

import redis
from prometheus_client import start_http_server

from segsvc.db import session_scope
from segsvc.metrics import (
    BROKER_QUEUE_LENGTH,
    MODEL_INFO,
    MODEL_LOAD_TIME,
    QUEUE_DEPTH,
    metrics_registry,
)
from segsvc.services import jobs as job_service
from segsvc.settings import Settings

log = logging.getLogger(__name__)

_started: dict[int, object] = {}


def start_metrics_server(port: int) -> bool:
    """Serve /metrics on `port` in a daemon thread (once per process); False when port is 0."""
    if port <= 0:
        return False
    if port not in _started:
        _started[port] = start_http_server(port, registry=metrics_registry())
        log.info("metrics on :%d/metrics", port)
    return True


def record_model(*, version: str, sha256: str, runtime: str, load_seconds: float) -> None:
    """Publish the version in service and how long it took to load."""
    MODEL_INFO.info({"production": version, "sha256": sha256[:12], "runtime": runtime})
    MODEL_LOAD_TIME.labels(version).set(load_seconds)


def sample_queue_depth(settings: Settings) -> dict[str, int]:
    """Set the depth gauges from Postgres (queued jobs) and Redis (broker list lengths)."""
    with session_scope(settings) as session:
        depth = job_service.queue_depth(session=session)
    QUEUE_DEPTH.set(depth)
    out = {"queued_jobs": depth}
    url = settings.effective_redis_url
    if url:
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            for queue in (settings.queue_name, settings.webhook_queue_name):
                length = int(client.llen(queue))
                BROKER_QUEUE_LENGTH.labels(queue).set(length)
                out[queue] = length
        finally:
            client.close()
    return out


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
