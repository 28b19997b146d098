"""A paused endpoint's backlog stays out of the claim's index range: every dispatcher poll (each
webhook worker's, every second) used to read all of it before its anti-join dropped it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import event, func, select, text, update

from segsvc.db import get_engine, session_scope
from segsvc.models import WebhookEndpoint, WebhookMessage, utcnow
from segsvc.services.keys import create_key
from segsvc.settings import Settings
from segsvc.webhooks import dispatch
from segsvc.webhooks.delivery import Outcome

DEAD = "https://dead.example/hook"
BACKLOG = 3000
TIMED_OUT = Outcome("retry", 15000.0, None, "timed out after 15 s")


def _backlog(settings: Settings, client_id: uuid.UUID) -> None:
    """BACKLOG due messages of one client's endpoint, each of a job of its own."""
    with get_engine(settings).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, client_id, status, created_at, attempts, releases, "
                "cancel_requested, input_sha256, input_content_type, input_width, input_height) "
                "SELECT gen_random_uuid(), :client, 'succeeded', now(), 1, 0, false, 'x', "
                "'image/png', 1, 1 FROM generate_series(1, :n)"
            ),
            {"client": client_id, "n": BACKLOG},
        )
        conn.execute(
            text(
                "INSERT INTO webhook_messages (id, job_id, client_id, event_type, url, payload, "
                "status, attempts, created_at, next_attempt_at) "
                "SELECT 'm' || row_number() OVER (ORDER BY id), id, client_id, 'job.completed', "
                ":url, '{}', 'pending', 0, now() - interval '1 hour', "
                "now() - interval '1 hour' + row_number() OVER (ORDER BY id) * interval '1 ms' "
                "FROM jobs"
            ),
            {"url": DEAD},
        )
        conn.execute(text("ANALYZE webhook_messages"))


def _claim_reads(settings: Settings) -> tuple[list[tuple[str, datetime]], int]:
    """Claim what is due, and how many message rows the claim's scans read (EXPLAIN ANALYZE
    of its SELECT, run again in a transaction that is rolled back)."""
    seen: list[tuple[str, Any]] = []
    engine = get_engine(settings)

    def capture(*args: Any) -> None:
        seen.append((args[2], args[3]))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(settings) as session:
            claimed = dispatch.claim_due(session=session)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    statement, params = next((s, p) for s, p in seen if "FOR UPDATE OF webhook_messages" in s)
    with engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).scalar()
        conn.rollback()
    tree = plan if isinstance(plan, list) else json.loads(plan)
    return claimed, _rows_read(tree[0]["Plan"])


@contextmanager
def _plans_of_backlog_moves(settings: Settings) -> Iterator[list[str]]:
    """The plans (EXPLAIN, not run again) of the UPDATEs that move an endpoint's backlog
    while the block runs."""
    seen: list[tuple[str, Any]] = []
    engine = get_engine(settings)

    def capture(*args: Any) -> None:
        statement = args[2]
        if statement.startswith("UPDATE webhook_messages") and "url =" in statement:
            seen.append((statement, args[3]))

    plans: list[str] = []
    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield plans
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    with engine.connect() as conn:
        for statement, params in seen:
            rows = conn.exec_driver_sql("EXPLAIN " + statement, params).scalars().all()
            plans.append("\n".join(rows))
        conn.rollback()


def _rows_read(node: dict[str, Any]) -> int:
    scan = node.get("Relation Name") == "webhook_messages" and "Scan" in node["Node Type"]
    own = node.get("Actual Rows", 0) * node.get("Actual Loops", 1) if scan else 0
    return own + sum(_rows_read(child) for child in node.get("Plans", []))


def _start(settings: Settings, claimed: list[tuple[str, datetime]]) -> list[dispatch.Prepared]:
    started = []
    for message_id, lease in claimed:
        with session_scope(settings) as session:
            prepared = dispatch.start_attempt(
                session=session, message_id=message_id, lease=lease, settings=settings
            )
        if prepared is not None:
            started.append(prepared)
    return started


def _record(settings: Settings, prepared: dispatch.Prepared, outcome: Outcome) -> None:
    with session_scope(settings) as session:
        dispatch.finish_attempt(
            session=session, prepared=prepared, outcome=outcome, settings=settings
        )
    with session_scope(settings) as session:
        dispatch.record_endpoint_outcome(
            session=session, prepared=prepared, outcome=outcome, settings=settings
        )


def _pause_ends(settings: Settings) -> None:
    """Time passes: the pause is over and every message it put off is due."""
    with session_scope(settings) as session:
        session.execute(update(WebhookEndpoint).values(paused_until=utcnow()))
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.status == "pending")
            .values(next_attempt_at=func.least(WebhookMessage.next_attempt_at, utcnow()))
        )


def _due_now(settings: Settings) -> int:
    with session_scope(settings) as session:
        return (
            session.scalar(
                select(func.count()).where(
                    WebhookMessage.status == "pending", WebhookMessage.next_attempt_at <= func.now()
                )
            )
            or 0
        )


def test_claim_due_reads_few_rows_of_a_paused_endpoints_backlog(settings: Settings) -> None:
    with session_scope(settings) as session:
        client_id = create_key(session=session, name="dead")[0].id
    _backlog(settings, client_id)
    claimed, _ = _claim_reads(settings)
    in_broker = claimed[1:]  # their hints still wait in the broker
    (first,) = _start(settings, claimed[:1])
    _record(settings, first, TIMED_OUT)  # the endpoint fails: paused
    claimed, read = _claim_reads(settings)
    assert claimed == []
    assert read <= 200, f"one claim read {read} rows of the paused backlog to claim none"
    assert _due_now(settings) == 0
    assert _start(settings, in_broker) == []  # their hints come: put off, no attempt

    # The pause ends: one probe, and while it runs the rest wait past the claim's range too.
    _pause_ends(settings)
    claimed, _ = _claim_reads(settings)
    (probe,) = _start(settings, claimed)
    claimed, read = _claim_reads(settings)
    assert claimed == []
    assert read <= 200, f"one claim during the probe read {read} rows of the backlog"

    # The probe fails: everything waits for the new pause's end, and comes due with it.
    _record(settings, probe, TIMED_OUT)
    with session_scope(settings) as session:
        endpoint = session.scalar(select(WebhookEndpoint))
        assert endpoint is not None
        assert endpoint.paused_until is not None
        waiting = session.scalar(
            select(func.count()).where(
                WebhookMessage.status == "pending",
                WebhookMessage.next_attempt_at >= endpoint.paused_until,
            )
        )
    assert waiting == BACKLOG - 1  # all but the probe, whose own retry time stands
    _pause_ends(settings)
    (second_probe,) = _start(settings, _claim_reads(settings)[0])
    with _plans_of_backlog_moves(settings) as plans:
        _record(settings, second_probe, Outcome("delivered", 1.0, 204))
    assert _due_now(settings) >= BACKLOG - 100  # a delivery lets the whole backlog go
    assert plans, "no UPDATE moved the backlog"
    for plan in plans:  # the conditions on a message's own retry time only filter what the
        # endpoint's index range yields: the index still finds the endpoint's messages
        assert "ix_webhook_messages_pending_endpoint" in plan, plan
