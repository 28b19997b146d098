"""Celery configuration shared by the API (which only sends by task name) and the workers."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu.entity import Queue

from segsvc.settings import Settings, get_settings

RUN_JOB = "segsvc.run_job"
DELIVER_WEBHOOK = "segsvc.deliver_webhook"
RECONCILE = "segsvc.reconcile"
RETRAIN = "segsvc.retrain"
# The webhook worker's Celery app (`worker.webhook_tasks`), by name: it consumes
# SEG_WEBHOOK_QUEUE_NAME only.
WEBHOOK_APP = "segsvc-webhooks"
# The keyword of a `segsvc.run_job` message that carries a suspect (`enqueue_jobs`).
SUSPECT_KWARG = "suspect"

# Redis re-delivers an unacknowledged message after this many seconds. It must exceed the
# longest time a message can sit prefetched plus its batch's run time, or a healthy worker's
# job would be handed to a second worker; the lease fence makes that harmless, but wasteful.
VISIBILITY_TIMEOUT_S = 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings every process agrees on."""
    transport: dict[str, Any] = {}
    if settings.celery_broker_url.startswith("sqla+"):
        _tune_sqla_transport()
    else:  # the SQLAlchemy transport hands these options to create_engine, so Redis only
        transport.update(
            visibility_timeout=VISIBILITY_TIMEOUT_S, socket_timeout=5, socket_connect_timeout=5
        )
    return {
        "broker_url": settings.celery_broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # workers reconnect on their own, forever
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A job is acknowledged only after its result is stored; if the worker dies first the
        # message goes back to the queue (and the lease fence stops a double run).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": settings.queue_name,
        "task_queues": [Queue(settings.queue_name), Queue(settings.webhook_queue_name)],
        "task_routes": {
            RUN_JOB: {"queue": settings.queue_name},
            DELIVER_WEBHOOK: {"queue": settings.webhook_queue_name},
        },
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


def _tune_sqla_transport() -> None:
    """Poll the embedded default's SQLite queue every 50 ms instead of every second.

    Kombu's SQLAlchemy transport forwards all transport options to `create_engine`, so the
    polling interval can only be set on the transport class.
    """
    from kombu.transport import sqlalchemy as sqla_transport

    sqla_transport.Transport.polling_interval = 0.05


def make_celery(settings: Settings | None = None, name: str = "segsvc") -> Celery:
    """A Celery app configured from settings (no tasks registered)."""
    settings = settings or get_settings()
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def enqueue_job(
    app: Celery, job_id: uuid.UUID, *, settings: Settings | None = None, suspect: bool = False
) -> None:
    """Send one job id to the inference queue by task name (no worker code imported);
    `suspect`: the reconciler's quarantine sends it, and a worker runs it alone."""
    enqueue_jobs(app, [job_id], settings=settings, suspect=suspect)


def enqueue_jobs(
    app: Celery,
    job_ids: Sequence[uuid.UUID],
    *,
    settings: Settings | None = None,
    suspect: bool = False,
) -> None:
    """Send jobs to the inference queue as one message (`run_job(*ids)`): a batch submit costs
    one broker round trip, and a worker settles the message once every id in it is stored.
    A suspect's message says so (`run_job(id, suspect=True)`): the worker runs it with no other
    job in its pipeline (a worker of an earlier release ignores the word and batches it)."""
    settings = settings or get_settings()
    args = [str(job_id) for job_id in job_ids]
    app.send_task(
        RUN_JOB,
        args=args,
        kwargs={SUSPECT_KWARG: True} if suspect else None,
        # Every id in plain text in the headers, which is where the reconciler looks for them
        # (the body is base64): Celery's own repr stops at 1024 characters, ~25 ids.
        argsrepr=repr(args),
        queue=settings.queue_name,
        retry=True,
        # One quick retry only: with the broker down the job is already stored and the
        # reconciler sends it later, so a submission must not stall on the broker.
        retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.1},
    )
