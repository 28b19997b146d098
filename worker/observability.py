"""Celery signal hooks for logs, metrics and probes (imported by `worker.celery_app`).

- logging: Celery leaves logging to us once a `setup_logging` receiver exists (JSON lines).
- metrics: `SEG_METRICS_PORT` starts /metrics in workers and beat; beat also samples the queue
  depth (it is the one process always running, even when workers are scaled to zero).
- probes: `SEG_PROBE_DIR/ready` once the model is loaded, `alive` on each heartbeat.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

from segsvc.logging_setup import configure_logging
from segsvc.metrics import WORKER_READY
from segsvc.ml.convert import CONVERT_TIMEOUT_S
from segsvc.settings import get_settings
from worker.metrics_server import QueueDepthSampler, record_model, start_metrics_server
from worker.probes import ALIVE, READY, clear_probes, write_probe

log = logging.getLogger(__name__)

_sampler: QueueDepthSampler | None = None
# A batch holding the model thread longer than this means the pipeline is wedged: above the
# longest legitimate step (a model conversion run on a batch's claim, bounded by its timeout).
PIPELINE_STALL_S = CONVERT_TIMEOUT_S + 300.0


def service_name(argv: list[str]) -> str:
    """beat, webhook-worker or worker, from the command line (a log field)."""
    if "beat" in argv:
        return "beat"
    return "webhook-worker" if get_settings().webhook_queue_name in argv else "worker"


def consumes_inference(app: Any) -> bool:
    """True when this worker takes jobs from the inference queue (so it needs the model)."""
    queues = app.amqp.queues.consume_from or app.amqp.queues
    return get_settings().queue_name in set(queues)


def _setup_logging(**_: Any) -> None:
    configure_logging(get_settings(), service=service_name(sys.argv))


def _worker_init(**_: Any) -> None:
    settings = get_settings()
    clear_probes(settings.probe_dir)
    WORKER_READY.set(0)
    start_metrics_server(settings.metrics_port)


def _worker_ready(sender: Any = None, **_: Any) -> None:
    """Ready only after the model answers; a webhook worker is ready when it consumes."""
    app = sender.app if sender is not None else None
    if app is not None and consumes_inference(app) and not _is_prefork(sender):
        from worker.tasks import get_segmenter

        try:
            loaded = get_segmenter().load()
        except Exception:
            log.exception("model load failed; staying unready")
            return
        record_model(
            version=loaded.version,
            sha256=loaded.sha256,
            runtime=loaded.runtime.name,
            load_seconds=loaded.load_seconds,
        )
    settings = get_settings()
    write_probe(settings.probe_dir, READY)
    write_probe(settings.probe_dir, ALIVE)
    WORKER_READY.set(1)


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
    clear_probes(get_settings().probe_dir)
    WORKER_READY.set(0)


def _beat_init(**_: Any) -> None:
    global _sampler
    settings = get_settings()
    if start_metrics_server(settings.metrics_port) and _sampler is None:
        _sampler = QueueDepthSampler(settings)
        _sampler.start()


# Connected without decorators: Celery's signal decorators are untyped.
signals.setup_logging.connect(_setup_logging)
signals.worker_init.connect(_worker_init)
signals.worker_ready.connect(_worker_ready)
signals.heartbeat_sent.connect(_heartbeat)
signals.worker_shutdown.connect(_worker_shutdown)
signals.beat_init.connect(_beat_init)
