"""worker/celery_app.py: beat's schedule leaves the inference queue (KEDA's trigger) alone."""

from __future__ import annotations

import time

import pytest
from celery import signals

from retrain.tasks import MAINTENANCE_QUEUE
from segsvc.queue import RECONCILE
from segsvc.settings import get_settings
from worker import webhook_tasks
from worker.celery_app import _reconcile_in_worker, app, settings


def test_beat_schedule_sends_nothing_to_the_inference_queue() -> None:
    # Regression: beat sent `segsvc.reconcile` to the default queue (inference) every
    # reconcile interval; KEDA activates on any message there, so workers never scaled to zero.
    schedule = app.conf.beat_schedule
    assert schedule
    for name, entry in schedule.items():
        queue = entry.get("options", {}).get("queue", app.conf.task_default_queue)
        assert queue == MAINTENANCE_QUEUE, f"{name} goes to {queue}"
        assert queue != settings.queue_name


def test_reconcile_runs_in_every_worker_instead_of_from_beat() -> None:
    assert RECONCILE not in {entry["task"] for entry in app.conf.beat_schedule.values()}
    # ... because each worker of this app (inference and maintenance) starts its own loop.
    receivers = [ref() for _, ref in signals.celeryd_after_setup.receivers]
    assert _reconcile_in_worker in receivers


def test_a_restarted_inference_worker_reconciles_before_its_model_load_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/durability.md: a pass runs "once when the worker starts, so a restarted worker
    recovers at once". The reconciler hung on `worker_ready` after the model load (minutes for
    a conversion), connected first to the same signal, so the pass waited for the whole load.
    Celery's start, in its order: `celeryd_after_setup` (Worker.on_start, before the consumer
    starts), then `worker_ready` (once the consumer is up)."""
    from worker import observability, reconciler

    class Consumer:  # what `worker_ready` sends (hashable: Celery caches receivers by sender)
        def __init__(self) -> None:
            self.app, self.pool = app, None

    events: list[str] = []

    def slow_load(*, retry: bool = False) -> bool:
        time.sleep(0.3)  # a conversion takes minutes
        events.append("model loaded")
        return True

    monkeypatch.setattr(observability, "_load_model", slow_load)
    monkeypatch.setattr(observability, "_mark_ready", lambda **_: events.append("ready"))
    monkeypatch.setattr(observability, "consumes_inference", lambda _app: True)
    monkeypatch.setattr(
        reconciler, "reconcile_periodically", lambda *_a, **_k: events.append("reconciling")
    )
    signals.celeryd_after_setup.send(sender="inference@test", instance=None, conf=app.conf)
    signals.worker_ready.send(sender=Consumer())
    assert events == ["reconciling", "model loaded", "ready"]


def test_worker_apps_limit_their_statements_but_not_the_maintenance_tasks() -> None:
    # Claims, stores, the reconciler and webhook dispatch: the workers' statement limits.
    assert settings.db_role == "worker"
    assert webhook_tasks.settings.db_role == "worker"
    # Retraining, canary verdicts and retention read get_settings(): an export of every label
    # or a purge of a long backlog may rightly run longer.
    assert get_settings().db_role == "admin"


def test_a_solo_worker_prefetches_three_batches_whatever_the_cpu_count(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`--pool solo` without `--concurrency` took the host's CPU count as the concurrency, and
    Celery multiplies prefetch by it: on a 32-core node one worker hoarded 32 x 3 batches."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    worker = app.WorkController(pool_cls="solo", queues=[settings.queue_name], hostname="t@x")
    assert worker.concurrency == 1
    assert worker.consumer.initial_prefetch_count == 3 * settings.batch_max_size


def test_the_maintenance_worker_starts_no_inference_pipeline(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The maintenance worker (same app, `-Q maintenance`) loaded the serving model and started
    the MicroBatcher's threads beside training; only an inference worker does."""
    from types import SimpleNamespace

    from worker import tasks

    started: list[str] = []
    monkeypatch.setattr(tasks, "get_batcher", lambda: started.append("batcher"))
    queues = app.amqp.queues
    monkeypatch.setattr(queues, "_consume_from", queues._consume_from)  # put back afterwards
    consumer = SimpleNamespace(connection_errors=())
    app.WorkController(pool_cls="solo", queues=["maintenance"], hostname="m@x")
    assert callable(tasks.run_job.Strategy(tasks.run_job, app, consumer))
    assert started == []
    app.WorkController(pool_cls="solo", queues=[settings.queue_name], hostname="i@x")
    tasks.run_job.Strategy(tasks.run_job, app, consumer)
    assert started == ["batcher"]  # an inference worker starts it up front
    receivers = {ref().__name__ for _, ref in signals.worker_process_init.receivers}
    assert "_load_model_after_fork" not in receivers


def test_shutdown_without_an_event_loop_sends_the_batchs_acks_before_the_channel_closes(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """make run's SQLAlchemy transport has no hub: Celery keeps the acks as pending
    operations, run only after the channel closed. The step runs them itself."""
    from types import SimpleNamespace

    from worker import tasks

    order: list[str] = []
    batcher = SimpleNamespace(close=lambda: order.append("batch stored"))
    consumer = SimpleNamespace(
        hub=None, perform_pending_operations=lambda: order.append("acks sent")
    )
    monkeypatch.setattr(tasks, "_batcher", batcher)
    tasks.CloseBatcherFirst(SimpleNamespace()).close(consumer)
    assert order == ["batch stored", "acks sent"]
