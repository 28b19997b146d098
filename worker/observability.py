"""Celery signal hooks for logs, metrics and probes (imported by `worker.celery_app`).

- logging: Celery leaves logging to us once a `setup_logging` receiver exists (JSON lines).
- metrics: `SEG_METRICS_PORT` starts /metrics in workers and beat, each serving the families of
  its role only (`exported_series`); beat also samples the queue depth (it is the one process
  always running, even when workers are scaled to zero).
- probes: `SEG_PROBE_DIR/ready` once the model is loaded (a failed load is retried until it
  succeeds), `alive` on each heartbeat and while the model loads.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import signals

from segsvc.logging_setup import configure_logging
from segsvc.metrics import (
    BEAT_SERIES,
    INFERENCE_SERIES,
    MAINTENANCE_SERIES,
    RECONCILER_SERIES,
    WEBHOOK_SERIES,
    WORKER_READY,
)
from segsvc.ml.convert import CONVERT_TIMEOUT_S
from segsvc.queue import WEBHOOK_APP
from segsvc.settings import get_settings
from worker.metrics_server import (
    QueueDepthSampler,
    load_retrain_last_success,
    start_metrics_server,
)
from worker.probes import ALIVE, READY, clear_probes, write_probe

log = logging.getLogger(__name__)

_sampler: QueueDepthSampler | None = None
# A batch holding the model thread longer than this means the pipeline is wedged: above the
# longest legitimate step (a model conversion run on a batch's claim, bounded by its timeout).
PIPELINE_STALL_S = CONVERT_TIMEOUT_S + 300.0
# A model load that failed at start (a database blip, say) is tried again after this many
# seconds, doubling up to the maximum, until it succeeds or the worker stops.
LOAD_RETRY_FIRST_S = 5.0
LOAD_RETRY_MAX_S = 60.0
ALIVE_EVERY_S = 2.0  # as often as Celery's heartbeats
# The queue of the workers that run no model besides the webhook queue: the maintenance worker's
# (`retrain.tasks.MAINTENANCE_QUEUE`, not imported: its shared tasks would join every app here).
MAINTENANCE_QUEUE = "maintenance"
_stopping = threading.Event()


def service_name(argv: list[str]) -> str:
    """beat, webhook-worker, maintenance-worker or worker, from the command line (a log
    field): its queues as `-Q` names them (`-Q maintenance`, or `-Q a,b`)."""
    if "beat" in argv:
        return "beat"
    settings = get_settings()
    named = {queue for arg in argv for queue in arg.split(",")}
    if settings.webhook_queue_name in named:
        return "webhook-worker"
    if MAINTENANCE_QUEUE in named and settings.queue_name not in named:
        return "maintenance-worker"
    return "worker"


def exported_series(queues: set[str]) -> frozenset[str]:
    """The metric families a worker consuming `queues` records, and so serves: a webhook
    worker's, an inference worker's, the maintenance worker's (retraining), and the
    reconciler's in every worker of `worker.celery_app` (any queue but the webhooks')."""
    settings = get_settings()
    series: set[str] = set()
    if settings.webhook_queue_name in queues:
        series |= WEBHOOK_SERIES
    if queues - {settings.webhook_queue_name}:
        series |= RECONCILER_SERIES
    if settings.queue_name in queues:
        series |= INFERENCE_SERIES
    if MAINTENANCE_QUEUE in queues:
        series |= MAINTENANCE_SERIES
    return frozenset(series)


def consumed_queues(app: Any) -> set[str]:
    """The queues this worker takes messages from (its `-Q`, else every queue of its app)."""
    return set(app.amqp.queues.consume_from or app.amqp.queues)


def consumes_inference(app: Any) -> bool:
    """True when this worker takes jobs from the inference queue (so it needs the model)."""
    return get_settings().queue_name in consumed_queues(app)


def warn_of_queue_mismatch(app: Any) -> bool:
    """Log an error when this worker consumes a queue that only an inference worker would
    (neither the webhook nor the maintenance queue) but not SEG_QUEUE_NAME's: it then loads no
    model and takes no job of the API's, silently (`-Q inference` while SEG_QUEUE_NAME is
    `gpu`, or the other way round); the webhook worker's app, when it does not consume
    SEG_WEBHOOK_QUEUE_NAME's. True when it did."""
    settings = get_settings()
    queues = consumed_queues(app)
    if getattr(app, "main", None) == WEBHOOK_APP:
        return _warn_of_webhook_queue_mismatch(queues, settings.webhook_queue_name)
    others = sorted(queues - {settings.webhook_queue_name, MAINTENANCE_QUEUE})
    if not others or settings.queue_name in queues:
        return False
    log.error(
        "QUEUE MISMATCH: this worker consumes %s but SEG_QUEUE_NAME is %r, so it loads no "
        "model and runs no inference job: start it with `-Q %s`, or set SEG_QUEUE_NAME to "
        "the queue it consumes (the same on the API and every worker)",
        ", ".join(map(repr, others)),
        settings.queue_name,
        settings.queue_name,
    )
    return True


def _warn_of_webhook_queue_mismatch(queues: set[str], wanted: str) -> bool:
    """The webhook worker's check: the dispatcher sends every delivery to
    SEG_WEBHOOK_QUEUE_NAME's queue, so a worker on another one (`-Q webhooks` while the setting
    was changed) delivers nothing, and said nothing."""
    if wanted in queues:
        return False
    log.error(
        "QUEUE MISMATCH: this webhook worker consumes %s but SEG_WEBHOOK_QUEUE_NAME is %r, so "
        "it delivers no webhook: start it with `-Q %s`, or set SEG_WEBHOOK_QUEUE_NAME to the "
        "queue it consumes (the same on every process)",
        ", ".join(map(repr, sorted(queues))),
        wanted,
        wanted,
    )
    return True


def _setup_logging(**_: Any) -> None:
    configure_logging(get_settings(), service=service_name(sys.argv))


def _worker_init(sender: Any = None, **_: Any) -> None:
    """Its `-Q` is parsed by now (Celery sets a worker's queues up before this signal)."""
    settings = get_settings()
    _stopping.clear()
    clear_probes(settings.probe_dir)
    WORKER_READY.set(0)
    queues = consumed_queues(sender.app) if sender is not None else set()
    only = exported_series(queues) if sender is not None else None
    start_metrics_server(settings.metrics_port, only=only)
    if MAINTENANCE_QUEUE in queues:
        try:
            load_retrain_last_success(settings)
        except Exception as exc:  # a database blip: the next successful run sets it
            log.warning("could not read the last successful retraining run: %s", exc)


def _worker_ready(sender: Any = None, **_: Any) -> None:
    """Ready only after the model answers; a webhook worker is ready when it consumes."""
    app = sender.app if sender is not None else None
    inference = app is not None and consumes_inference(app)
    if app is not None and not inference:
        warn_of_queue_mismatch(app)
    if inference and not _is_prefork(sender):
        with _alive_meanwhile(get_settings().probe_dir, PIPELINE_STALL_S):
            loaded = _load_model()
        if not loaded:
            # Jobs load the model lazily, so the worker may well serve: keep trying, so that it
            # reports ready once it can (rather than be killed by its startup probe).
            threading.Thread(target=_load_until_ready, name="model-load-retry", daemon=True).start()
            return
    _mark_ready(inference=inference)


def _load_model(*, retry: bool = False) -> bool:
    """Load (and warm) the serving model; False when that failed (logged). The model manager
    publishes the versions it serves (`segsvc_model_info`, their load times) on this load and
    on every switch after it, so nothing is published here."""
    from worker.tasks import get_segmenter

    try:
        get_segmenter().load(retry=retry)
    except Exception:
        log.exception("model load failed; staying unready (trying again)")
        return False
    return True


def _load_until_ready() -> None:
    """Try the model load again, with backoff, until it succeeds; then report ready."""
    delay = LOAD_RETRY_FIRST_S
    while not _stopping.wait(delay):
        if _load_model(retry=True):
            if not _stopping.is_set():
                _mark_ready(inference=True)
            return
        delay = min(delay * 2, LOAD_RETRY_MAX_S)


def _mark_ready(*, inference: bool) -> None:
    """Write both probe files; only inference workers count in `segsvc_worker_ready` (the
    dashboard's "Workers ready" sums it: webhook and maintenance workers serve no model)."""
    settings = get_settings()
    write_probe(settings.probe_dir, READY)
    write_probe(settings.probe_dir, ALIVE)
    if inference:
        WORKER_READY.set(1)


@contextmanager
def _alive_meanwhile(probe_dir: Path | None, limit_s: float) -> Iterator[None]:
    """Keep `alive` fresh (for at most `limit_s`) while this thread loads the model: no
    heartbeat runs then, and a liveness probe may already watch (after a startup probe passed
    on `started` while the broker was down); a load past the limit counts as wedged."""
    done = threading.Event()

    def refresh() -> None:
        until = time.monotonic() + limit_s
        while time.monotonic() < until:
            write_probe(probe_dir, ALIVE)
            if done.wait(ALIVE_EVERY_S):
                return

    thread = threading.Thread(target=refresh, name="alive-while-loading", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def _is_prefork(consumer: Any) -> bool:
    """Prefork children load their own model copies; the parent must not load one."""
    from celery.concurrency.prefork import TaskPool

    return isinstance(getattr(consumer, "pool", None), TaskPool)


def _heartbeat(**_: Any) -> None:
    """Refresh `alive`, unless the inference pipeline no longer turns: a wedged model thread
    would otherwise hold its messages while the event loop (and so this signal) runs on."""
    tasks = sys.modules.get("worker.tasks")  # not imported: no pipeline (e.g. webhook workers)
    batcher = tasks.current_batcher() if tasks is not None else None
    why = batcher.stalled(PIPELINE_STALL_S) if batcher is not None else None
    if why is not None:
        log.error("inference pipeline stalled (%s); no longer reporting alive", why)
        return
    write_probe(get_settings().probe_dir, ALIVE)


def _worker_shutdown(**_: Any) -> None:
    _stopping.set()
    clear_probes(get_settings().probe_dir)
    WORKER_READY.set(0)


def _beat_init(**_: Any) -> None:
    global _sampler
    settings = get_settings()
    if start_metrics_server(settings.metrics_port, only=BEAT_SERIES) and _sampler is None:
        _sampler = QueueDepthSampler(settings)
        _sampler.start()


# Connected without decorators: Celery's signal decorators are untyped.
signals.setup_logging.connect(_setup_logging)
signals.worker_init.connect(_worker_init)
signals.worker_ready.connect(_worker_ready)
signals.heartbeat_sent.connect(_heartbeat)
signals.worker_shutdown.connect(_worker_shutdown)
signals.beat_init.connect(_beat_init)
