"""The dispatcher at production sizes (segsvc/webhooks/dispatch.py): a claim judges a bounded
window of the due range, walked in its index's order, however large the due backlog and
whatever the statistics say; a paused endpoint's backlog at the head of that range does not
hide other clients' messages for long; and a dead endpoint's pause cycle rewrites a bounded
chunk of its backlog while its row is locked, not all of it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update

from segsvc.db import get_engine, session_scope
from segsvc.migrate import upgrade
from segsvc.models import WebhookEndpoint, WebhookMessage, utcnow
from segsvc.services.keys import create_key
from segsvc.settings import Settings
from segsvc.webhooks import dispatch
from segsvc.webhooks.delivery import Outcome
from tests.segsvc.webhooks.factories import finish_job, make_job, start_job

pytestmark = pytest.mark.timeout(120)

DEAD = "https://dead.example/hook"
LIVE = "https://live.example/hook"
TIMED_OUT = Outcome("retry", 15000.0, None, "timed out after 15 s")


def _client(settings: Settings, name: str) -> uuid.UUID:
    with session_scope(settings) as session:
        return create_key(session=session, name=name)[0].id


def _due_messages(
    settings: Settings, client_id: uuid.UUID, url: str, n: int, *, age_s: float, tag: str
) -> None:
    """`n` due messages of one client's endpoint, each of a job of its own, due from `age_s`
    seconds ago on, a millisecond apart (one INSERT ... SELECT each, not n ORM rows)."""
    with get_engine(settings).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, client_id, status, created_at, attempts, releases, "
                "cancel_requested, input_sha256, input_content_type, input_width, input_height) "
                "SELECT md5(:tag || g)::uuid, :client, 'succeeded', now(), 1, 0, false, 'x', "
                "'image/png', 1, 1 FROM generate_series(1, :n) g"
            ),
            {"client": client_id, "n": n, "tag": tag},
        )
        conn.execute(
            text(
                "INSERT INTO webhook_messages (id, job_id, client_id, event_type, url, payload, "
                "status, attempts, created_at, next_attempt_at) "
                "SELECT :tag || g, md5(:tag || g)::uuid, :client, 'job.completed', :url, '{}', "
                "'pending', 0, now() - :age * interval '1 s', "
                "now() - :age * interval '1 s' + g * interval '1 ms' "
                "FROM generate_series(1, :n) g"
            ),
            {"client": client_id, "n": n, "tag": tag, "url": url, "age": age_s},
        )
        conn.execute(text("ANALYZE webhook_messages"))
        conn.execute(text("ANALYZE webhook_endpoints"))


def _pause(settings: Settings, client_id: uuid.UUID, url: str, *, for_s: float) -> None:
    with session_scope(settings) as session:
        session.add(
            WebhookEndpoint(
                client_id=client_id,
                url=url,
                failures=3,
                paused_until=utcnow() + timedelta(seconds=for_s),
            )
        )


def _claim(settings: Settings, limit: int = 100) -> list[str]:
    with session_scope(settings) as session:
        return [message_id for message_id, _ in dispatch.claim_due(session=session, limit=limit)]


def _rows_read(node: dict[str, Any]) -> int:
    """Rows that the plan's scans of webhook_messages yielded, all loops counted."""
    scan = node.get("Relation Name") == "webhook_messages" and "Scan" in node["Node Type"]
    own = node.get("Actual Rows", 0) * node.get("Actual Loops", 1) if scan else 0
    return own + sum(_rows_read(child) for child in node.get("Plans", []))


def _largest_sort(node: dict[str, Any]) -> int:
    """The most rows any Sort node of the plan took in."""
    own = 0
    if node["Node Type"] == "Sort":
        own = max(c.get("Actual Rows", 0) * c.get("Actual Loops", 1) for c in node["Plans"])
    return max([own, *(_largest_sort(child) for child in node.get("Plans", []))])


def _claim_plans(settings: Settings) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE of each locking SELECT a claim runs (run again, rolled back)."""
    seen: list[tuple[str, Any]] = []
    engine = get_engine(settings)

    def capture(*args: Any) -> None:
        if args[2].startswith("SELECT") and "FOR UPDATE" in args[2]:
            seen.append((args[2], args[3]))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(settings) as session:
            plans = []
            dispatch.claim_due(session=session)
            for statement, params in seen:
                plan = (
                    session.connection()
                    .exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params)
                    .scalar()
                )
                tree = plan if isinstance(plan, list) else json.loads(str(plan))
                plans.append(tree[0]["Plan"])
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return plans


@contextmanager
def _rows_written() -> Iterator[dict[str, int]]:
    """Rows that the block's UPDATEs of webhook_messages changed, summed (all engines)."""
    written = {"rows": 0}

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE webhook_messages"):
            written["rows"] += max(cursor.rowcount, 0)

    from sqlalchemy.engine import Engine

    event.listen(Engine, "after_cursor_execute", count)
    try:
        yield written
    finally:
        event.remove(Engine, "after_cursor_execute", count)


def test_a_claim_walks_the_due_index_whatever_the_backlog(settings: Settings) -> None:
    """Regression: the claim read and sorted every due message to lease 100 (a paused
    endpoint's anti-join, estimated at one row, made the planner take a bitmap scan of the
    due range, a blocked-probe per row and a full sort): 1.6 s for 100k due."""
    live, dead = _client(settings, "live"), _client(settings, "dead")
    _pause(settings, dead, DEAD, for_s=600)  # a paused endpoint, no message due
    _due_messages(settings, live, LIVE, 20_000, age_s=3600, tag="l")
    plans = _claim_plans(settings)
    assert plans
    for plan in plans:
        read = _rows_read(plan)
        assert read <= 3 * dispatch.CLAIM_WINDOW, f"a claim read {read} of 20000 due rows"
        assert _largest_sort(plan) <= dispatch.CLAIM_WINDOW
    assert len(_claim(settings)) == 100


def test_a_paused_endpoints_backlog_at_the_head_does_not_starve_other_clients(
    settings: Settings,
) -> None:
    """A paused endpoint's due backlog, older than any other due message: the claims move it
    to the pause's end a bounded sweep at a time (never all in one statement) and other
    clients' messages behind it are claimed meanwhile, within a poll or two."""
    live, dead = _client(settings, "live"), _client(settings, "dead")
    backlog = dispatch.SWEEP_ROUNDS * dispatch.CLAIM_WINDOW + 2000  # more than one claim sweeps
    _due_messages(settings, dead, DEAD, backlog, age_s=7200, tag="d")
    _due_messages(settings, live, LIVE, 50, age_s=60, tag="l")
    _pause(settings, dead, DEAD, for_s=600)
    claims = [_claim(settings), _claim(settings)]
    claimed = {m for c in claims for m in c}
    assert claimed == {f"l{g}" for g in range(1, 51)}  # all of the others, none of the paused
    with session_scope(settings) as session:
        endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.url == DEAD))
        assert endpoint is not None
        moved = session.scalars(
            select(WebhookMessage.next_attempt_at).where(WebhookMessage.url == DEAD)
        ).all()
    assert set(moved) == {endpoint.paused_until}  # all of the backlog waits for the pause's end


def test_a_pause_cycle_moves_a_bounded_chunk_of_a_dead_endpoints_backlog_under_its_lock(
    settings: Settings,
) -> None:
    """Regression: a probe (`start_attempt`) and its failure (`record_endpoint_outcome`) each
    rewrote the endpoint's whole backlog with its row locked (7.7 s and 11.8 s for 300k, and
    every delivery thread with a hint for it waited on that lock). Each moves MOVE_CHUNK at
    most now; the claims move the rest as it comes due, to the same pause end."""
    dead = _client(settings, "dead")
    backlog = 3 * dispatch.MOVE_CHUNK
    _due_messages(settings, dead, DEAD, backlog, age_s=3600, tag="d")
    with session_scope(settings) as session:  # failed before; its pause has just ended
        session.add(WebhookEndpoint(client_id=dead, url=DEAD, failures=3))
    with session_scope(settings) as session:
        ((first, lease),) = dispatch.claim_due(session=session, limit=1)

    with _rows_written() as written, session_scope(settings) as session:
        probe = dispatch.start_attempt(
            session=session, message_id=first, lease=lease, settings=settings
        )
    assert isinstance(probe, dispatch.Prepared)
    assert written["rows"] <= dispatch.MOVE_CHUNK + 1  # the chunk, and the probe's own lease
    for _ in range(backlog // (dispatch.SWEEP_ROUNDS * dispatch.CLAIM_WINDOW) + 2):
        assert _claim(settings) == []  # the rest of the backlog waits for the probe too
    with session_scope(settings) as session:
        waiting = session.scalars(
            select(WebhookMessage.next_attempt_at).where(WebhookMessage.id != first)
        ).all()
    assert set(waiting) == {probe.lease}

    with session_scope(settings) as session:
        dispatch.finish_attempt(
            session=session, prepared=probe, outcome=TIMED_OUT, settings=settings
        )
    with _rows_written() as written, session_scope(settings) as session:
        dispatch.record_endpoint_outcome(
            session=session, prepared=probe, outcome=TIMED_OUT, settings=settings
        )
    assert written["rows"] <= dispatch.MOVE_CHUNK
    with session_scope(settings) as session:  # the probe's lease runs out
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.next_attempt_at == probe.lease)
            .values(next_attempt_at=func.now())
        )
    for _ in range(backlog // (dispatch.SWEEP_ROUNDS * dispatch.CLAIM_WINDOW) + 2):
        assert _claim(settings) == []
    with session_scope(settings) as session:
        endpoint = session.scalar(select(WebhookEndpoint))
        assert endpoint is not None
        waiting = session.scalars(
            select(WebhookMessage.next_attempt_at).where(WebhookMessage.id != first)
        ).all()
    assert set(waiting) == {endpoint.paused_until}  # all of it, at the new pause's end


def test_claims_sweep_a_paused_endpoint_on_sqlite(tmp_path: Path) -> None:
    """The embedded dev mode (SQLite): the window, the sweep and the claim still work."""
    cfg = Settings(var_dir=tmp_path, _env_file=None)
    upgrade(settings=cfg)
    with session_scope(cfg) as session:
        other = create_key(session=session, name="other")[0].id
    paused_job, live_job = make_job(cfg, DEAD), make_job(cfg, DEAD, client_id=other)
    for job_id in (paused_job, live_job):
        finish_job(cfg, start_job(cfg, job_id))
    until = utcnow() + timedelta(minutes=10)
    with session_scope(cfg) as session:  # paused after its message was recorded: due now
        session.add(WebhookEndpoint(client_id=None, url=DEAD, failures=2, paused_until=until))
    claimed = _claim(cfg)
    with session_scope(cfg) as session:
        rows = dict(
            session.execute(select(WebhookMessage.job_id, WebhookMessage.next_attempt_at)).all()
        )
    assert len(claimed) == 1
    assert rows[paused_job] == until  # swept to its endpoint's pause end
    leased = rows[live_job]
    assert leased is not None
    assert leased > utcnow()
