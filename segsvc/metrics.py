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
# A job's wait from submit to start runs far past a request's latency: with the workers scaled
# to zero it includes a cold start (a pod scheduled, a model loaded: about a minute, an XLA
# compile minutes more), and a backlog waits behind it. Ending at 120 s, its p95 and p99
# flat-lined at 120 exactly when they mattered.
QUEUE_WAIT_BUCKETS = (*LATENCY_BUCKETS, 300, 600, 1800)
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
    "segsvc_job_queue_wait_seconds", "Time from submit to start.", buckets=QUEUE_WAIT_BUCKETS
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
WORKER_READY = Gauge("segsvc_worker_ready", "1 once the worker has loaded its model.")
# The families an inference worker records (`metrics_registry(only=...)`).
INFERENCE_SERIES = frozenset(
    {
        "segsvc_jobs",
        "segsvc_job_queue_wait_seconds",
        "segsvc_batch_predict_seconds",
        "segsvc_batch_size",
        "segsvc_model",  # an info family drops _info
        "segsvc_model_load_seconds",
        "segsvc_worker_ready",
    }
)
# Every worker of `worker.celery_app` (inference and maintenance) runs the reconciler, which
# counts the jobs it ends in `segsvc_jobs_total`.
RECONCILER_SERIES = frozenset({"segsvc_jobs"})

# --- beat: the sampler (`worker.metrics_server.sample_queue_depth`, every 15 s) ----------------
QUEUE_DEPTH = Gauge("segsvc_queue_depth", "Jobs waiting (queued in Postgres).")
BROKER_QUEUE_LENGTH = Gauge(
    "segsvc_broker_queue_length", "Messages waiting in the broker list, by queue.", ["queue"]
)
# What KEDA scales the inference workers on: the jobs Postgres holds queued or running
# (k8s/base/inference-worker-scaledobject.yaml), their sum being its backlog.
JOB_STATES = ("queued", "running")
JOBS_IN_STATE = Gauge(
    "segsvc_jobs_in_state",
    "Jobs Postgres holds in each state KEDA counts (queued, running): their sum is its backlog.",
    ["state"],
)
WEBHOOK_PENDING = Gauge(
    "segsvc_webhook_pending_messages",
    "Webhook messages pending in Postgres (due, waiting for a retry, or held by a pause).",
)
BEAT_SERIES = frozenset(
    {
        "segsvc_queue_depth",
        "segsvc_broker_queue_length",
        "segsvc_jobs_in_state",
        "segsvc_webhook_pending_messages",
    }
)

# --- webhook workers -------------------------------------------------------------------------
WEBHOOK_DELIVERIES = Counter(
    "segsvc_webhook_deliveries_total", "Webhook attempts by outcome.", ["outcome"]
)
WEBHOOK_LATENCY = Histogram(
    "segsvc_webhook_attempt_seconds", "Webhook attempt duration.", buckets=LATENCY_BUCKETS
)
# One per message, when it ends (after the transaction that ended it commits): the attempts'
# outcomes above cannot say it, a "retry" whose next time would pass the max age ending the
# message failed, and a message past its max age ending with no attempt at all.
WEBHOOK_END_STATUSES = ("delivered", "failed", "disabled")
WEBHOOK_ENDED = Counter(
    "segsvc_webhook_messages_ended_total",
    "Webhook messages ended by a webhook worker, by final status: delivered, failed (its "
    "endpoint answered 410 Gone, its URL was refused, or it was still failing past "
    "SEG_WEBHOOK_MAX_AGE_SECONDS, with or without an attempt; other answers are retried), "
    "disabled (pending when its endpoint answered 410 Gone). "
    "Messages recorded already disabled are not counted.",
    ["status"],
)
for _status in WEBHOOK_END_STATUSES:  # at 0 from the start: the first failure shows in rate()
    WEBHOOK_ENDED.labels(_status)
WEBHOOK_SERIES = frozenset(
    {
        "segsvc_webhook_deliveries",
        "segsvc_webhook_attempt_seconds",
        "segsvc_webhook_messages_ended",
    }
)

# --- maintenance worker: retraining (retrain/tasks.py) ----------------------------------------
# A run's final status (`retrain.pipeline.RunResult.status`), `busy` when another run held the
# lock, `error` when it raised; the successful ones: a run that did what it should, trained and
# gated a candidate (whatever its verdict) or had nothing to do (too few new labels, a canary
# still deciding).
RETRAIN_RESULTS = ("completed", "skipped", "failed", "busy", "error")
RETRAIN_SUCCESS = frozenset({"completed", "skipped"})
RETRAIN_RUNS = Counter(
    "segsvc_retrain_runs_total",
    "Retraining runs of the maintenance worker, by result: completed, skipped (nothing to do), "
    "failed, busy (another run held the lock), error (it raised).",
    ["result"],
)
for _result in RETRAIN_RESULTS:
    RETRAIN_RUNS.labels(_result)
RETRAIN_LAST_SUCCESS = Gauge(
    "segsvc_retrain_last_success_timestamp_seconds",
    "When the last successful retraining run (completed or skipped) ended, Unix time; read "
    "from Postgres when the maintenance worker starts, 0 if none ever was.",
)
MAINTENANCE_SERIES = RECONCILER_SERIES | {
    "segsvc_retrain_runs",
    "segsvc_retrain_last_success_timestamp_seconds",
}


class _Only(Collector):
    """Another collector's families, of ours (`segsvc_...`) only those named in `names`: the
    client library's own (process_..., python_gc_...) pass."""

    def __init__(self, inner: Collector, names: frozenset[str]) -> None:
        self.inner = inner
        self.names = names

    def collect(self) -> Iterable[Metric]:
        for family in self.inner.collect():
            if family.name not in self.names and family.name.startswith("segsvc_"):
                continue
            if family.type == "info":
                # An Info not set yet (an inference worker loading its first model) has one
                # sample without labels: an empty row in the dashboard's model table.
                family.samples = [sample for sample in family.samples if sample.labels]
                if not family.samples:
                    continue
            yield family


def metrics_registry(*, only: frozenset[str] | None = None) -> CollectorRegistry:
    """The registry to expose: every process's files in multiprocess mode, else this process;
    with `only` (the families the process's role records: API_SERIES, INFERENCE_SERIES, ...),
    just those of ours.

    Every series defined above exists in every process that imports this module, an unlabeled
    one with its zero: without `only`, gunicorn's API exported the workers' series
    (`segsvc_worker_ready{pid=...} 0` for each API process, dead ones included), and webhook,
    maintenance and beat processes `segsvc_model_info 1.0` (an empty row in the dashboard's
    model table), `segsvc_worker_ready 0` and `segsvc_queue_depth 0` (a 0 with beat down,
    rather than no data)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if only is None:
            return REGISTRY
        registry = CollectorRegistry()
        registry.register(_Only(REGISTRY, only))
        return registry
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    files = multiprocess.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
    registry.register(files if only is None else _Only(files, only))
    return registry
