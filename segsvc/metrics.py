"""Prometheus metrics shared by the API, the workers and the webhook workers.

Define every series here so names stay consistent; processes only import and observe them.
(Multiprocess mode for gunicorn and the /metrics endpoints are wired by the operations code.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# In multiprocess mode (gunicorn sets it) every series writes a file in this folder as soon as
# it is defined below: a process that finds the variable but not the folder (a container whose
# /tmp is a fresh emptyDir) would fail to import this module at all.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# --- API -------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "segsvc_http_requests_total",
    "HTTP requests by route and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "segsvc_http_request_duration_seconds",
    "HTTP request latency.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
# Requests that asked to be held (`?wait=`): their time is mostly the wait the client chose
# (up to 30 s), so they have a series of their own and the latency above stays the API's own.
HTTP_LONG_POLL = Histogram(
    "segsvc_http_long_poll_duration_seconds",
    "HTTP requests held by ?wait= (a long poll, a submit that waits): their time, hold included.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
SUBMISSIONS = Counter("segsvc_submissions_total", "Jobs accepted (202).")
REJECTIONS = Counter("segsvc_rejections_total", "Submissions refused, by reason.", ["reason"])
# The families the API records (`metrics_registry(only=...)`; a counter's family drops _total).
API_SERIES = frozenset(
    {
        "segsvc_http_requests",
        "segsvc_http_request_duration_seconds",
        "segsvc_http_long_poll_duration_seconds",
        "segsvc_submissions",
        "segsvc_rejections",
    }
)

# --- inference workers -------------------------------------------------------------------------
# Every ending but one: a queued job canceled through the API ends in the API process, which
# counts the request (`segsvc_http_requests_total` on the cancel route), not the job here.
JOBS_FINISHED = Counter(
    "segsvc_jobs_total",
    "Jobs ended by a worker, by status: those it stores or gives up on (succeeded, failed, "
    "canceled) and those its reconciler ends (failed: lost too often, worker_lost or "
    "poison_input; canceled: cancel requested while lost, or while queued after a release). "
    "Queued jobs canceled through the API end in the API process and are not counted.",
    ["status"],
)
QUEUE_WAIT = Histogram(
    "segsvc_job_queue_wait_seconds", "Time from submit to start.", buckets=LATENCY_BUCKETS
)
PREDICT_TIME = Histogram(
    "segsvc_batch_predict_seconds",
    "Forward-pass time per batch.",
    ["model_version"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("segsvc_batch_size", "Jobs per forward pass.", buckets=BATCH_BUCKETS)
MODEL_INFO = Info(
    "segsvc_model", "Model versions a worker serves: production and canary (empty when none)."
)
MODEL_LOAD_TIME = Gauge(
    "segsvc_model_load_seconds", "Time to load and warm a model version.", ["model_version"]
)
QUEUE_DEPTH = Gauge("segsvc_queue_depth", "Jobs waiting (queued in Postgres).")
BROKER_QUEUE_LENGTH = Gauge(
    "segsvc_broker_queue_length", "Messages waiting in the broker list, by queue.", ["queue"]
)
WORKER_READY = Gauge("segsvc_worker_ready", "1 once the worker has loaded its model.")

# --- webhook workers -------------------------------------------------------------------------
WEBHOOK_DELIVERIES = Counter(
    "segsvc_webhook_deliveries_total", "Webhook attempts by outcome.", ["outcome"]
)
WEBHOOK_LATENCY = Histogram(
    "segsvc_webhook_attempt_seconds", "Webhook attempt duration.", buckets=LATENCY_BUCKETS
)


class _Only(Collector):
    """Another collector's families named in `names`, and no others."""

    def __init__(self, inner: Collector, names: frozenset[str]) -> None:
        self.inner = inner
        self.names = names

    def collect(self) -> Iterable[Metric]:
        return (family for family in self.inner.collect() if family.name in self.names)


def metrics_registry(*, only: frozenset[str] | None = None) -> CollectorRegistry:
    """The registry to expose: every process's files in multiprocess mode (with `only`, just
    those families), else this process.

    Every series defined above writes a zero to a process's files as it is imported: without
    `only`, gunicorn's API exported the workers' series too (`segsvc_worker_ready{pid=...} 0`,
    `segsvc_queue_depth{pid=...} 0` for each API process, dead ones included)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    files = multiprocess.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
    registry.register(files if only is None else _Only(files, only))
    return registry
