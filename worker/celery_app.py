"""The worker's Celery app: shared config plus worker-only settings and signals.

Start it with `celery -A worker.celery_app worker -Q inference --pool solo` (the pool it is
built for: the model runs in the MicroBatcher's threads, and `worker.observability` loads it
once the worker is ready, only where the worker consumes the inference queue).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from retrain.tasks import beat_schedule as retrain_beat_schedule
from segsvc.db import with_db_role
from segsvc.queue import make_celery
from segsvc.settings import get_settings
from worker import observability  # noqa: F401  (connects the log, metrics and probe hooks)

log = logging.getLogger(__name__)

# What this app hands out (the Segmenter's claims and stores, the reconciler) runs under the
# worker's statement limits (SEG_WORKER_STATEMENT_TIMEOUT_SECONDS, ...). The maintenance tasks
# (retrain/tasks.py: retraining exports every label, retention may purge a long backlog) read
# get_settings(), whose role stays `admin`: no limits.
settings = with_db_role(get_settings(), "worker")
app = make_celery(settings, name="segsvc-worker")
app.conf.update(
    # Run with `--pool solo`: the consumer only buffers job ids for the MicroBatcher
    # (worker/batcher.py), whose threads run the model. With acks_late a message stays
    # unacknowledged until its batch's results are committed, so prefetch (multiplier x
    # concurrency 1) bounds the jobs in the pipeline: one batch storing, one in the model and
    # one forming = 3 x batch_max_size. Less starves the model under load; more only hoards
    # messages that another worker could run (and that wait for redelivery if this one dies).
    # A batch submit's message carries several jobs: it takes as many prefetch slots as it
    # has jobs while it is held (worker/tasks.py hold_prefetch), so this counts jobs.
    worker_prefetch_multiplier=max(3 * settings.batch_max_size, 1),
    # Celery multiplies prefetch by the concurrency, and `--pool solo` without `--concurrency`
    # takes the host's CPU count for it (a node's, in a pod: 3 x 16 x 32 messages on a
    # 32-core node), although the solo pool runs one task at a time. One worker would then
    # drain the queue, hoard it while the workers KEDA adds for it find none, and have its old
    # messages counted as lost.
    worker_concurrency=1,
    imports=("worker.tasks", "worker.reconciler", "retrain.tasks"),
)
# The feedback loop: retraining (settings.retrain_cron), canary verdicts and input retention,
# all on the maintenance queue. Beat sends no reconcile pass: every worker of this app (the
# inference workers and the always-running maintenance worker) runs one every interval from a
# thread of its own (`_reconcile_in_worker`): a beat message on the inference queue woke a
# worker every interval (KEDA then counted that list), so scale-to-zero never held.
app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), **retrain_beat_schedule(settings)}


# On `celeryd_after_setup`, which a starting worker sends before its consumer connects, not on
# `worker_ready`: `worker.observability` loads the model in its `worker_ready` receiver (minutes
# for a conversion), and Celery calls one signal's receivers one after the other, in the order
# they were connected (an import order), so a pass started there waited for the whole load.
# Not `worker_init` either: that one comes with every `WorkController` built, a test's too.
@signals.celeryd_after_setup.connect
def _reconcile_in_worker(**_: Any) -> None:
    """A (re)started worker recovers what a dead one left behind at once, before it loads its
    model, and keeps reconciling from its own thread (`reconcile_periodically`)."""
    from worker.reconciler import reconcile_periodically

    reconcile_periodically(settings, app)
