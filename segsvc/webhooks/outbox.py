"""The outbox: webhook messages are rows written in the same transaction as the job change."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from segsvc.models import Job, WebhookEndpoint, WebhookMessage, db_time
from segsvc.serialize import job_json

JOB_STARTED = "job.started"
JOB_COMPLETED = "job.completed"
EVENT_FILTERS = {"start": JOB_STARTED, "completed": JOB_COMPLETED}
DEFAULT_FILTERS = ("completed",)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
DISABLED = "disabled"


def job_message_id(job_id: uuid.UUID, event: str) -> str:
    """The message id of a job's `event`, which is also the `webhook-id` header of every
    attempt: the same whenever it is recorded, so a client that
    deduplicates on `webhook-id` sees one event even if it is recorded twice. That happens to
    job.started when Postgres crashes after the webhook worker sent it but before the claim
    that recorded it was flushed (claims commit without waiting for the WAL): the job is
    claimed again and its start recorded again."""
    return f"msg_{uuid.uuid5(job_id, event).hex}"


def find_endpoint(
    *, session: Session, client_id: uuid.UUID | None, url: str, lock: bool = False
) -> WebhookEndpoint | None:
    """The client's endpoint state for `url`, if any was recorded; `lock`: its row locked
    (FOR UPDATE) until the transaction ends, read afresh."""
    owner = (
        WebhookEndpoint.client_id.is_(None)
        if client_id is None
        else (WebhookEndpoint.client_id == client_id)
    )
    query = select(WebhookEndpoint).where(owner, WebhookEndpoint.url == url)
    if lock:
        query = query.with_for_update().execution_options(populate_existing=True)
    return session.scalar(query)


def record_job_events(*, session: Session, job_ids: Sequence[uuid.UUID], event: str) -> int:
    """Add one pending message per job subscribed to `event`; returns how many were added."""
    if not job_ids:
        return 0
    wanted = next(name for name, ev in EVENT_FILTERS.items() if ev == event)
    jobs = session.scalars(
        select(Job)
        .where(Job.id.in_(list(job_ids)), Job.webhook_url.is_not(None))
        .execution_options(populate_existing=True)  # the state just written by an UPDATE
    ).all()
    jobs = [job for job in jobs if wanted in (job.webhook_events or DEFAULT_FILTERS)]
    if not jobs:
        return 0
    # The database's clock: messages recorded by several hosts keep their order, and a first
    # attempt is due when the dispatcher, judging by that clock too, thinks it is.
    now = db_time(session)
    disabled, paused = _endpoint_states(session, {job.webhook_url or "" for job in jobs}, now)
    session.add_all(
        _message(
            job,
            event,
            now,
            disabled=(job.client_id, job.webhook_url) in disabled,
            due=paused.get((job.client_id, job.webhook_url or ""), now),
        )
        for job in jobs
    )
    session.flush()
    return len(jobs)


Endpoint = tuple[uuid.UUID | None, str]  # (client, url)


def _endpoint_states(
    session: Session, urls: set[str], now: datetime
) -> tuple[set[Endpoint], dict[Endpoint, datetime]]:
    """Among `urls` (one query for a whole batch), the endpoints a 410 disabled, and those
    paused, with the pause's end: a message recorded for a paused endpoint is due then, not
    now, so the dispatcher's claim (by due time) never walks past it while the pause lasts."""
    rows = session.execute(
        select(
            WebhookEndpoint.client_id,
            WebhookEndpoint.url,
            WebhookEndpoint.disabled_at,
            WebhookEndpoint.paused_until,
        ).where(
            WebhookEndpoint.url.in_(urls),
            or_(WebhookEndpoint.disabled_at.is_not(None), WebhookEndpoint.paused_until > now),
        )
    ).all()
    disabled = {(row[0], row[1]) for row in rows if row[2] is not None}
    paused = {(row[0], row[1]): row[3] for row in rows if row[3] is not None and row[3] > now}
    return disabled, paused


def _message(
    job: Job, event: str, now: datetime, *, disabled: bool, due: datetime
) -> WebhookMessage:
    url = job.webhook_url or ""
    return WebhookMessage(
        id=job_message_id(job.id, event),
        job_id=job.id,
        client_id=job.client_id,
        event_type=event,
        url=url,
        # Links are made absolute at send time, from the deployment's public URL.
        payload=job_json(job, base_url=""),
        status=DISABLED if disabled else PENDING,
        attempts=0,
        created_at=now,
        next_attempt_at=None if disabled else due,
    )
