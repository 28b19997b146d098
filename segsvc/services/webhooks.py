"""Webhooks for clients: subscriptions at submit, signing secrets, the delivery log, redelivery."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, or_, select, text
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.sql.elements import ColumnElement

from segsvc.errors import NotFoundError, ValidationError
from segsvc.models import WebhookMessage, WebhookSecret, db_now, db_time
from segsvc.services.jobs import get_job
from segsvc.settings import Settings
from segsvc.webhooks.outbox import EVENT_FILTERS, PENDING, find_endpoint
from segsvc.webhooks.signing import new_secret
from segsvc.webhooks.ssrf import UnsafeTargetError, check_url, parse_networks


@dataclass(frozen=True)
class Subscription:
    """What a job's submitter asked to be told about (url None: no webhook)."""

    url: str | None = None
    events: list[str] | None = None


def parse_subscription(
    *,
    session: Session,
    client_id: uuid.UUID | None,
    url: str | None,
    events: Sequence[str],
    settings: Settings,
) -> Subscription:
    """Validate the `webhook` and `webhook_events` form fields (422 on anything wrong)."""
    url = (url or "").strip()
    filters = [p.strip().lower() for raw in events for p in raw.split(",") if p.strip()]
    if not url:
        if filters:
            raise ValidationError("'webhook_events' needs a 'webhook' URL.")
        return Subscription()
    unknown = sorted(set(filters) - set(EVENT_FILTERS))
    if unknown:
        raise ValidationError(
            f"Unknown webhook_events {unknown}; use a subset of {sorted(EVENT_FILTERS)}."
        )
    try:
        check_url(url, allow=parse_networks(settings.webhook_allow_networks))
    except UnsafeTargetError as exc:
        raise ValidationError(str(exc)) from None
    endpoint = find_endpoint(session=session, client_id=client_id, url=url)
    if endpoint is not None and endpoint.disabled_at is not None:
        raise ValidationError(
            f"This webhook URL was disabled on {endpoint.disabled_at:%Y-%m-%d %H:%M} UTC "
            f"({endpoint.disabled_reason}); redeliver one of its messages to enable it again."
        )
    ordered = [name for name in EVENT_FILTERS if name in filters] or ["completed"]
    return Subscription(url=url, events=ordered)


# --- signing secrets ---------------------------------------------------------------------------
# Secrets that keep signing beside a new one after a rotation: each is one more signature on
# every delivery, so rotations in a loop (each within the window of the last) would otherwise
# grow the header past what receivers accept, and the table without end.
MAX_PREVIOUS_SECRETS = 3


def signing_secrets(*, session: Session, client_id: uuid.UUID | None) -> list[WebhookSecret]:
    """The client's secrets that sign now, newest first (one is created on first use)."""
    rows = _active_secrets(session, client_id)
    if rows:
        return rows
    _lock_client(session, client_id)  # two first uses at once must not make two secrets
    rows = _active_secrets(session, client_id)
    if not rows:
        rows = [
            WebhookSecret(
                id=uuid.uuid4(),
                client_id=client_id,
                secret=new_secret(),
                created_at=db_time(session),
            )
        ]
        session.add(rows[0])
        session.flush()
    return rows


def rotate_secret(
    *, session: Session, client_id: uuid.UUID | None, settings: Settings
) -> WebhookSecret:
    """A new current secret; the old ones keep signing for the rotation window, at most
    `MAX_PREVIOUS_SECRETS` of them (the oldest stop at once), and expired ones are deleted."""
    _lock_client(session, client_id)
    # The database's clock, which the signing workers judge the window by too (`_active_secrets`):
    # hosts whose clocks are off neither cut the old secret's window short nor stretch it.
    now = db_time(session)
    window_end = now + timedelta(seconds=settings.webhook_secret_rotation_seconds)
    for i, row in enumerate(_active_secrets(session, client_id)):  # newest first
        if i >= MAX_PREVIOUS_SECRETS:
            row.expires_at = now
        elif row.expires_at is None or row.expires_at > window_end:
            row.expires_at = window_end
    session.execute(
        delete(WebhookSecret).where(
            _secret_owner(client_id),
            WebhookSecret.expires_at.is_not(None),
            WebhookSecret.expires_at <= now,
        )
    )
    fresh = WebhookSecret(id=uuid.uuid4(), client_id=client_id, secret=new_secret(), created_at=now)
    session.add(fresh)
    session.flush()
    return fresh


def _secret_owner(client_id: uuid.UUID | None) -> ColumnElement[bool]:
    return (
        WebhookSecret.client_id.is_(None)
        if client_id is None
        else (WebhookSecret.client_id == client_id)
    )


def _active_secrets(session: Session, client_id: uuid.UUID | None) -> list[WebhookSecret]:
    live = or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > db_now(session))
    query = (
        select(WebhookSecret)
        .where(_secret_owner(client_id), live)
        .order_by(WebhookSecret.created_at.desc())
    )
    return list(session.scalars(query).all())


def _lock_client(session: Session, client_id: uuid.UUID | None) -> None:
    """Serialize secret changes per client until the transaction ends (SQLite: one writer)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.sha256(f"webhook-secret:{client_id}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


# --- delivery log ------------------------------------------------------------------------------
def list_messages(
    *, session: Session, job_id: str, client_id: uuid.UUID | None
) -> list[WebhookMessage]:
    """A job's messages, oldest first, with their attempts loaded."""
    job = get_job(session=session, job_id=job_id, client_id=client_id)
    query = (
        select(WebhookMessage)
        .where(WebhookMessage.job_id == job.id)
        .order_by(WebhookMessage.created_at)
        .options(selectinload(WebhookMessage.attempt_log))
    )
    return list(session.scalars(query).all())


def redeliver(
    *, session: Session, job_id: str, message_id: str, client_id: uuid.UUID | None
) -> WebhookMessage:
    """Send a message again now (re-enabling its endpoint and ending its pause); retries
    follow within its max age."""
    job = get_job(session=session, job_id=job_id, client_id=client_id)
    found = session.execute(  # another job's message is not locked, not even for a moment
        select(WebhookMessage.client_id, WebhookMessage.url).where(
            WebhookMessage.id == message_id, WebhookMessage.job_id == job.id
        )
    ).first()
    if found is None:
        raise NotFoundError(f"No webhook message {message_id[:64]!r} for job {job.id}.")
    # The endpoint's lock before the message's, as every writer of both takes them
    # (`webhooks.dispatch`): the other way round, this deadlocked with a 410 being recorded.
    endpoint = find_endpoint(session=session, client_id=found.client_id, url=found.url, lock=True)
    # Locked, and so read after any attempt being recorded has committed: what is written
    # below then changes what that attempt wrote (unchanged fields would not be written).
    message = session.scalar(
        select(WebhookMessage)
        .where(WebhookMessage.id == message_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if message is None:  # its job was deleted meanwhile
        raise NotFoundError(f"No webhook message {message_id[:64]!r} for job {job.id}.")
    if endpoint is not None:
        endpoint.disabled_at = None
        endpoint.disabled_reason = None
        # Asked for now: the pause a failing run (or a long Retry-After) set ends. Its run of
        # failures stays, so the next attempt to it is a single probe (`dispatch.start_attempt`).
        endpoint.paused_until = None
    message.status = PENDING
    message.next_attempt_at = db_time(session)  # the clock the dispatcher judges it by
    # Asked for now, however old: the max age ends the retries after this attempt, not it.
    message.redelivered_at = message.next_attempt_at
    message.completed_at = None
    session.flush()
    return message
