"""/v1 webhooks: the signing secret (read, rotate) and a job's delivery log (list, redeliver)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from api.auth import authenticate_request, current_client
from api.context import db, settings
from segsvc.models import WebhookAttempt, WebhookMessage
from segsvc.serialize import iso
from segsvc.services import limits
from segsvc.services import webhooks as webhook_service

bp = Blueprint("webhooks", __name__, url_prefix="/v1")
bp.before_request(authenticate_request)


@bp.get("/webhooks/secret")
def read_secret() -> Response:
    """The caller's current `whsec_` signing secret (made on first use)."""
    session = db()
    rows = webhook_service.signing_secrets(session=session, client_id=_client_id())
    session.commit()
    return jsonify({"key": rows[0].secret})


@bp.post("/webhooks/secret/rotate")
def rotate_secret() -> Response:
    """A new secret; the previous one keeps signing for the rotation window. Each takes one
    of the key's submission tokens (a loop of rotations is refused, not absorbed)."""
    limits.check_rate(client_key=str(current_client().id), settings=settings())
    session = db()
    row = webhook_service.rotate_secret(
        session=session, client_id=_client_id(), settings=settings()
    )
    session.commit()
    return jsonify(
        {
            "key": row.secret,
            "previous_valid_for_seconds": settings().webhook_secret_rotation_seconds,
        }
    )


@bp.get("/jobs/<job_id>/webhooks")
def list_messages(job_id: str) -> Response:
    """Every message for the job with every attempt (status, duration, error, next try)."""
    rows = webhook_service.list_messages(session=db(), job_id=job_id, client_id=_client_id())
    return jsonify({"messages": [message_json(m) for m in rows]})


@bp.post("/jobs/<job_id>/webhooks/<message_id>/redeliver")
def redeliver(job_id: str, message_id: str) -> tuple[Response, int]:
    """Send a message again now (also re-enables an endpoint disabled by 410 Gone). Each takes
    one of the key's submission tokens: every one makes the service POST to the client's URL."""
    limits.check_rate(client_key=str(current_client().id), settings=settings())
    session = db()
    row = webhook_service.redeliver(
        session=session, job_id=job_id, message_id=message_id, client_id=_client_id()
    )
    session.commit()
    return jsonify(message_json(row)), 202


def _client_id() -> Any:
    """The caller's id (None when auth is off: the deployment's own secret)."""
    return current_client().id


def message_json(m: WebhookMessage) -> dict[str, Any]:
    """A message and its attempts as the delivery log shows them."""
    return {
        "id": m.id,
        "event_type": m.event_type,
        "url": m.url,
        "status": m.status,
        "attempts": m.attempts,
        "created_at": iso(m.created_at),
        "next_attempt_at": iso(m.next_attempt_at),
        "last_attempt_at": iso(m.last_attempt_at),
        "completed_at": iso(m.completed_at),
        "attempt_log": [_attempt_json(a) for a in m.attempt_log],
    }


def _attempt_json(a: WebhookAttempt) -> dict[str, Any]:
    return {
        "attempted_at": iso(a.attempted_at),
        "status_code": a.status_code,
        "duration_ms": a.duration_ms,
        "error": a.error,
        "response_body": a.response_body,
        "next_attempt_at": iso(a.next_attempt_at),
    }
