"""Celery tasks: thin wrappers that load by id and call the Segmenter."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery_batches import Batches, SimpleRequest

from segsvc.queue import RUN_JOB
from worker.celery_app import app, settings
from worker.segmenter import Segmenter

log = logging.getLogger(__name__)

_segmenter: Segmenter | None = None


def get_segmenter() -> Segmenter:
    """The process's one Segmenter (created lazily, after any fork)."""
    global _segmenter
    if _segmenter is None:
        _segmenter = Segmenter(settings)
    return _segmenter


@app.task(
    name=RUN_JOB,
    base=Batches,
    flush_every=settings.batch_max_size,
    flush_interval=settings.batch_max_wait_ms / 1000.0,
    acks_late=True,
)
def run_job(requests: Sequence[SimpleRequest]) -> dict[str, Any]:
    """Run the buffered jobs as one micro-batch (duplicate ids and finished jobs are no-ops)."""
    job_ids = list(dict.fromkeys(str(r.args[0]) for r in requests if r.args))
    size = settings.batch_max_size
    totals: dict[str, Any] = {}
    for start in range(0, len(job_ids), size):
        counts = get_segmenter().run_jobs(job_ids[start : start + size])
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    log.info("batch of %d messages: %s", len(requests), totals)
    return totals
