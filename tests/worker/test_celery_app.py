"""worker/celery_app.py: beat's schedule leaves the inference queue (KEDA's trigger) alone."""

from __future__ import annotations

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
    receivers = [ref() for _, ref in signals.worker_ready.receivers]
    assert _reconcile_in_worker in receivers


def test_worker_apps_limit_their_statements_but_not_the_maintenance_tasks() -> None:
    # Claims, stores, the reconciler and webhook dispatch: the workers' statement limits.
    assert settings.db_role == "worker"
    assert webhook_tasks.settings.db_role == "worker"
    # Retraining, canary verdicts and retention read get_settings(): an export of every label
    # or a purge of a long backlog may rightly run longer.
    assert get_settings().db_role == "admin"
