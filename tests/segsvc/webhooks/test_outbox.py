"""Messages written with the job change, claimed by lease, moved on by attempt outcomes."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from segsvc.db import get_sessionmaker, session_scope
from segsvc.models import WebhookAttempt, WebhookEndpoint, WebhookMessage, utcnow
from segsvc.services import jobs as job_service
from segsvc.services import webhooks as webhook_service
from segsvc.services.keys import create_key
from segsvc.settings import Settings
from segsvc.webhooks import dispatch
from segsvc.webhooks.delivery import Outcome
from segsvc.webhooks.dispatch import (
    claim_due,
    finish_attempt,
    record_endpoint_outcome,
    start_attempt,
)
from tests.segsvc.webhooks.factories import finish_job, make_job, start_job

URL = "https://hooks.example/segsvc"


def messages(settings: Settings, job_id: uuid.UUID | None = None) -> list[WebhookMessage]:
    with session_scope(settings) as session:
        query = select(WebhookMessage).order_by(WebhookMessage.created_at)
        if job_id is not None:
            query = query.where(WebhookMessage.job_id == job_id)
        return list(session.scalars(query).all())


def start(settings: Settings, message_id: str, lease: datetime) -> dispatch.Prepared | None:
    """`start_attempt` in a transaction of its own, as `deliver_message` runs it; None when it
    makes no attempt (a message it ends without one, `dispatch.Ended`, included)."""
    with session_scope(settings) as session:
        prepared = start_attempt(
            session=session, message_id=message_id, lease=lease, settings=settings
        )
    return prepared if isinstance(prepared, dispatch.Prepared) else None


def attempt(settings: Settings, outcome: Outcome) -> list[str]:
    """Claim what is due and record `outcome` for each (no HTTP), one after the other."""
    with session_scope(settings) as session:
        claimed = claim_due(session=session)
    statuses = []
    for message_id, lease in claimed:
        prepared = start(settings, message_id, lease)
        if prepared is not None:
            statuses.append(record(settings, prepared, outcome))
    return statuses


def test_record_events_default_is_completed_only(settings: Settings) -> None:
    job_id = make_job(settings, URL)
    finish_job(settings, start_job(settings, job_id))
    (msg,) = messages(settings, job_id)
    assert msg.event_type == "job.completed"
    assert msg.payload["status"] == "succeeded"
    assert msg.payload["result"] == {"class_fractions": [0.5, 0.4, 0.1]}
    assert msg.status == "pending"
    assert msg.id.startswith("msg_")


def test_record_events_start_and_completed_snapshot_each_state(settings: Settings) -> None:
    job_id = make_job(settings, URL, ["start", "completed"])
    claimed = start_job(settings, job_id)
    finish_job(settings, claimed)
    started, completed = messages(settings, job_id)
    assert (started.event_type, started.payload["status"]) == ("job.started", "running")
    assert (completed.event_type, completed.payload["status"]) == ("job.completed", "succeeded")


def test_record_events_for_every_terminal_state(settings: Settings) -> None:
    failed, canceled, plain = (
        make_job(settings, URL),
        make_job(settings, URL),
        make_job(settings, None),
    )
    claimed = start_job(settings, failed)
    with session_scope(settings) as session:
        job_service.fail_job(
            session=session,
            job_id=failed,
            code="boom",
            message="x",
            lease_token=claimed.lease_token,
        )
        job_service.cancel_job(session=session, job_id=str(canceled), client_id=None)
        job_service.cancel_job(session=session, job_id=str(plain), client_id=None)
    got = {m.job_id: m.payload["status"] for m in messages(settings)}
    assert got == {failed: "failed", canceled: "canceled"}


def record(settings: Settings, prepared: dispatch.Prepared, outcome: Outcome) -> str:
    """Record an attempt's outcome as `deliver_message` does: the attempt, then its endpoint."""
    with session_scope(settings) as session:
        status = finish_attempt(
            session=session, prepared=prepared, outcome=outcome, settings=settings
        )
    with session_scope(settings) as session:
        record_endpoint_outcome(
            session=session, prepared=prepared, outcome=outcome, settings=settings
        )
    return status


def attempt_the_one_due(settings: Settings) -> dispatch.Prepared:
    """Claim the only due message and start its attempt (no HTTP)."""
    with session_scope(settings) as session:
        ((message_id, lease),) = claim_due(session=session)
    prepared = start(settings, message_id, lease)
    assert prepared is not None
    return prepared


def test_claim_due_keeps_started_before_completed(settings: Settings) -> None:
    job_id = make_job(settings, URL, ["start", "completed"])
    finish_job(settings, start_job(settings, job_id))
    with session_scope(settings) as session:
        first = claim_due(session=session)
        assert [m for m, _ in first] == [messages(settings, job_id)[0].id]
        assert claim_due(session=session) == []  # leased, and completed waits for it
    assert attempt(settings, Outcome("retry", 1.0, 500, "HTTP 500")) == []  # still leased


def test_finish_attempt_retries_on_growing_schedule_then_delivers(settings: Settings) -> None:
    cfg = settings.model_copy(update={"webhook_schedule": "0,1,2"})
    job_id = make_job(cfg, URL)
    finish_job(cfg, start_job(cfg, job_id))
    assert attempt(cfg, Outcome("retry", 1.0, 500, "HTTP 500")) == ["pending"]
    msg = messages(cfg)[0]
    first_wait = msg.next_attempt_at - msg.last_attempt_at  # type: ignore[operator]
    _make_due(cfg, msg.id)
    assert attempt(cfg, Outcome("retry", 1.0, None, "timed out")) == ["pending"]
    msg = messages(cfg)[0]
    second_wait = msg.next_attempt_at - msg.last_attempt_at  # type: ignore[operator]
    assert timedelta(seconds=0.8) < first_wait < timedelta(seconds=1.2) < second_wait
    _make_due(cfg, msg.id)
    assert attempt(cfg, Outcome("delivered", 1.0, 204)) == ["delivered"]
    msg = messages(cfg)[0]
    assert (msg.attempts, msg.next_attempt_at) == (3, None)


def test_finish_attempt_gives_up_past_max_age(settings: Settings) -> None:
    cfg = settings.model_copy(update={"webhook_schedule": "0,60", "webhook_max_age_seconds": 30})
    finish_job(cfg, start_job(cfg, make_job(cfg, URL)))
    assert attempt(cfg, Outcome("retry", 1.0, 503, "HTTP 503")) == ["failed"]


def test_gone_disables_endpoint_for_that_client_only(settings: Settings) -> None:
    first, second = make_job(settings, URL), make_job(settings, URL)
    finish_job(settings, start_job(settings, first))
    finish_job(settings, start_job(settings, second))
    with session_scope(settings) as session:
        (message_id, lease), *_ = claim_due(session=session, limit=1)
    prepared = start(settings, message_id, lease)
    assert prepared is not None
    record(settings, prepared, Outcome("gone", 1.0, 410))
    assert sorted(m.status for m in messages(settings)) == ["disabled", "failed"]
    with session_scope(settings) as session:
        endpoint = session.scalar(select(WebhookEndpoint))
        assert endpoint is not None
        assert endpoint.disabled_at is not None
        assert endpoint.client_id is None
    third = make_job(settings, URL)
    finish_job(settings, start_job(settings, third))
    assert messages(settings, third)[0].status == "disabled"
    with session_scope(settings) as session:  # another client's jobs to the same URL still go
        other, _ = create_key(session=session, name="other")
        other_id = other.id
    fourth = make_job(settings, URL, client_id=other_id)
    finish_job(settings, start_job(settings, fourth))
    assert messages(settings, fourth)[0].status == "pending"


def test_two_gone_answers_for_one_url_at_once_share_one_endpoint_row(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: both deliveries found no endpoint row and inserted one; the second lost the
    # unique index and its whole delivery transaction failed (its attempt unrecorded).
    from segsvc.webhooks import dispatch, outbox

    first, second = make_job(settings, URL), make_job(settings, URL)
    finish_job(settings, start_job(settings, first))
    finish_job(settings, start_job(settings, second))
    with session_scope(settings) as session:
        winner = session.scalars(select(WebhookMessage)).first()
        assert winner is not None
        row = dispatch._endpoint_row(session, winner.client_id, winner.url)  # the first 410
        row.disabled_at = utcnow()
    real_find = outbox.find_endpoint
    reads: list[object] = []

    def read_before_the_winner_committed(**kwargs: object) -> object:
        reads.append(kwargs)
        return None if len(reads) == 1 else real_find(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch.outbox, "find_endpoint", read_before_the_winner_committed)
    with session_scope(settings) as session:
        loser = session.scalars(select(WebhookMessage)).all()[-1]
        endpoint = dispatch._endpoint_row(session, loser.client_id, loser.url)
        assert endpoint.disabled_at is not None  # the winner's row
        session.execute(select(WebhookMessage))  # the transaction is still usable
    assert len(reads) == 2
    with session_scope(settings) as session:
        assert len(session.scalars(select(WebhookEndpoint)).all()) == 1


def test_redeliver_reenables_and_resends(settings: Settings) -> None:
    job_id = make_job(settings, URL)
    finish_job(settings, start_job(settings, job_id))
    assert attempt(settings, Outcome("gone", 1.0, 410)) == ["failed"]
    msg = messages(settings)[0]
    with session_scope(settings) as session:
        webhook_service.redeliver(
            session=session, job_id=str(job_id), message_id=msg.id, client_id=None
        )
    assert attempt(settings, Outcome("delivered", 1.0, 200)) == ["delivered"]
    assert messages(settings)[0].attempts == 2


@pytest.mark.parametrize("attempted", [True, False])
def test_a_redeliver_of_a_message_past_its_max_age_is_attempted_once(
    settings: Settings, attempted: bool
) -> None:
    """A receiver down for days: its messages ended failed (past the max age, attempted or
    not). Once it is fixed, a redeliver answered 202 pending, but the dispatcher failed the
    message again at once for its age, with no attempt: nothing was ever sent."""
    job_id = make_job(settings, URL)
    finish_job(settings, start_job(settings, job_id))
    if attempted:
        assert attempt(settings, Outcome("retry", 1.0, 500, "HTTP 500")) == ["pending"]
    msg = messages(settings)[0]
    aged = utcnow() - timedelta(seconds=settings.webhook_max_age_seconds + 3600)
    with session_scope(settings) as session:
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id == msg.id)
            .values(created_at=aged, last_attempt_at=aged if attempted else None)
        )
    if not attempted:  # never attempted past its max age: failed without an attempt, as before
        assert attempt(settings, Outcome("delivered", 1.0, 200)) == []
        assert messages(settings)[0].status == "failed"
    with session_scope(settings) as session:
        webhook_service.redeliver(
            session=session, job_id=str(job_id), message_id=msg.id, client_id=None
        )
    assert attempt(settings, Outcome("retry", 1.0, 500, "HTTP 500")) == ["failed"]
    assert messages(settings)[0].attempts == (2 if attempted else 1)  # made, then no retry
    with session_scope(settings) as session:  # asked again: attempted again
        webhook_service.redeliver(
            session=session, job_id=str(job_id), message_id=msg.id, client_id=None
        )
    assert attempt(settings, Outcome("delivered", 1.0, 200)) == ["delivered"]


def test_redeliver_of_another_jobs_message_neither_finds_nor_waits_for_it(
    settings: Settings,
) -> None:
    """A message id under a job it does not belong to is 404 at once: it was locked (and its
    lock waited for, while an attempt was being recorded) before its job was compared."""
    from segsvc.errors import NotFoundError

    mine = make_job(settings, URL)
    other = make_job(settings, URL)
    finish_job(settings, start_job(settings, mine))
    (msg,) = messages(settings, mine)
    outcome: list[object] = []

    def redeliver_under_the_other_job() -> None:
        try:
            with session_scope(settings) as session:
                webhook_service.redeliver(
                    session=session, job_id=str(other), message_id=msg.id, client_id=None
                )
        except Exception as exc:  # the outcome is what is checked
            outcome.append(exc)

    with session_scope(settings) as holding:  # an attempt being recorded holds the message
        holding.get(WebhookMessage, msg.id, with_for_update=True)
        thread = threading.Thread(target=redeliver_under_the_other_job)
        thread.start()
        thread.join(3)  # the lock wait would last SEG_DB_LOCK_TIMEOUT_SECONDS (5)
        answered_while_held = not thread.is_alive()
    thread.join(30)
    assert answered_while_held
    assert len(outcome) == 1
    assert isinstance(outcome[0], NotFoundError)


def test_a_redeliver_while_an_attempt_is_being_recorded_is_not_lost(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt read its message, then a redeliver came before the attempt wrote its result:
    the redeliver waits for it (the attempt holds the row) and the message is pending again,
    instead of the attempt writing "failed" over the redeliver's "pending"."""
    job_id = make_job(settings, URL)
    finish_job(settings, start_job(settings, job_id))
    prepared = attempt_the_one_due(settings)
    message_id = prepared.message_id
    read, go_on = threading.Event(), threading.Event()
    real_next_state = dispatch._next_state

    def paused(*args: Any, **kwargs: Any) -> Any:  # between the attempt's read and its write
        read.set()
        go_on.wait(10)
        return real_next_state(*args, **kwargs)

    monkeypatch.setattr(dispatch, "_next_state", paused)

    def record() -> None:
        with session_scope(settings) as session:
            finish_attempt(
                session=session,
                prepared=prepared,
                outcome=Outcome("gone", 1.0, 410),
                settings=settings,
            )

    recorder = threading.Thread(target=record)
    recorder.start()
    assert read.wait(10)
    redelivered: list[float] = []

    def redeliver() -> None:
        with session_scope(settings) as session:
            webhook_service.redeliver(
                session=session, job_id=str(job_id), message_id=message_id, client_id=None
            )
        redelivered.append(time.monotonic())

    redeliverer = threading.Thread(target=redeliver)
    redeliverer.start()
    redeliverer.join(0.5)
    go_on.set()
    recorder.join(10)
    redeliverer.join(10)
    assert redelivered
    (msg,) = messages(settings, job_id)
    assert (msg.status, msg.completed_at) == ("pending", None)  # the redeliver stands


def test_a_410_of_an_attempt_overtaken_by_a_redeliver_still_disables_the_endpoint(
    settings: Settings,
) -> None:
    """The redeliver made the attempt in flight a superseded one, whose outcome was only
    logged: the receiver's 410 Gone was lost, and the redelivered copy went out anyway."""
    job_id = make_job(settings, URL)
    finish_job(settings, start_job(settings, job_id))
    prepared = attempt_the_one_due(settings)
    message_id = prepared.message_id
    with session_scope(settings) as session:
        webhook_service.redeliver(
            session=session, job_id=str(job_id), message_id=message_id, client_id=None
        )
    assert record(settings, prepared, Outcome("gone", 1.0, 410)) == "superseded"
    (msg,) = messages(settings, job_id)
    assert msg.status == "disabled"
    with session_scope(settings) as session:
        endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.url == URL))
        assert endpoint is not None
        assert endpoint.disabled_at is not None


def test_rotate_secret_keeps_old_one_signing_for_window(settings: Settings) -> None:
    with session_scope(settings) as session:
        (first,) = webhook_service.signing_secrets(session=session, client_id=None)
        first_key = first.secret
        (again,) = webhook_service.signing_secrets(session=session, client_id=None)
        assert again.secret == first_key
        new = webhook_service.rotate_secret(session=session, client_id=None, settings=settings)
        keys = [r.secret for r in webhook_service.signing_secrets(session=session, client_id=None)]
        assert keys == [new.secret, first_key]
        first.expires_at = utcnow() - timedelta(seconds=1)  # the window has passed
        keys = [r.secret for r in webhook_service.signing_secrets(session=session, client_id=None)]
        assert keys == [new.secret]


def test_rotations_in_a_loop_keep_at_most_four_secrets_signing_and_stored(
    settings: Settings,
) -> None:
    """Each rotation within the window of the last added a signature to every delivery (and a
    row for ever): a loop of them made headers no receiver accepts."""
    from segsvc.models import WebhookSecret

    a = _client(settings, "a")
    with session_scope(settings) as session:
        webhook_service.signing_secrets(session=session, client_id=a)
    made = []
    for _ in range(10):
        with session_scope(settings) as session:
            made.append(
                webhook_service.rotate_secret(
                    session=session, client_id=a, settings=settings
                ).secret
            )
    with session_scope(settings) as session:
        signing = [r.secret for r in webhook_service.signing_secrets(session=session, client_id=a)]
        stored = session.scalars(select(WebhookSecret).where(WebhookSecret.client_id == a)).all()
    assert signing == made[::-1][:4]  # the newest and the 3 before it, newest first
    assert len(stored) == 4


def _make_due(settings: Settings, message_id: str) -> None:
    """Time passes for the message (and for its endpoint's pause, if it failed)."""
    with session_scope(settings) as session:
        msg = session.get(WebhookMessage, message_id)
        assert msg is not None
        msg.next_attempt_at = utcnow()
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.url == msg.url)
            .values(paused_until=None)
            .execution_options(synchronize_session=False)
        )


def _client(settings: Settings, name: str) -> uuid.UUID:
    with session_scope(settings) as session:
        key, _ = create_key(session=session, name=name)
        return key.id


def _finished_job(settings: Settings, url: str, client_id: uuid.UUID) -> str:
    job_id = make_job(settings, url, client_id=client_id)
    finish_job(settings, start_job(settings, job_id))
    return messages(settings, job_id)[0].id


def _endpoint(settings: Settings, url: str) -> WebhookEndpoint:
    with session_scope(settings) as session:
        endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.url == url))
        assert endpoint is not None
        session.expunge(endpoint)
        return endpoint


def test_a_failing_endpoint_pauses_its_messages_and_no_other_clients(settings: Settings) -> None:
    """One client's receiver times out: its other messages wait, unclaimed, instead of each
    holding a delivery thread for the whole timeout while everyone else's notices queue."""
    dead, alive = "https://dead.example/hook", "https://alive.example/hook"
    a, b = _client(settings, "a"), _client(settings, "b")
    first, *backlog = [_finished_job(settings, dead, a) for _ in range(3)]
    with session_scope(settings) as session:
        (claimed,) = [c for c in claim_due(session=session) if c[0] == first]
        for other in backlog:  # not claimed in that pass: they wait to be claimed later
            session.execute(
                update(WebhookMessage)
                .where(WebhookMessage.id == other)
                .values(next_attempt_at=utcnow())
                .execution_options(synchronize_session=False)
            )
    prepared = start(settings, *claimed)
    assert prepared is not None
    record(settings, prepared, Outcome("retry", 15000.0, None, "timed out after 15 s"))
    endpoint = _endpoint(settings, dead)
    assert endpoint.failures == 1
    assert endpoint.paused_until is not None
    healthy = _finished_job(settings, alive, b)
    same_url_other_client = _finished_job(settings, dead, b)
    with session_scope(settings) as session:
        due = {message_id for message_id, _ in claim_due(session=session)}
    assert due == {healthy, same_url_other_client}  # none of the paused endpoint's backlog


def test_a_hint_sent_before_the_pause_makes_no_attempt(settings: Settings) -> None:
    """Hints already in the broker when the endpoint failed: each is put off to the pause's
    end without an attempt (and without counting one). The pause lasts at least what the
    answer's Retry-After asked, even past SEG_WEBHOOK_ENDPOINT_PAUSE_MAX_SECONDS."""
    settings = settings.model_copy(update={"webhook_endpoint_pause_max_seconds": 10})
    a = _client(settings, "a")
    ids = [_finished_job(settings, URL, a) for _ in range(2)]
    with session_scope(settings) as session:
        claimed = dict(claim_due(session=session))
    prepared = start(settings, ids[0], claimed[ids[0]])
    assert prepared is not None
    record(settings, prepared, Outcome("retry", 1.0, 503, "HTTP 503", retry_after="60"))
    assert start(settings, ids[1], claimed[ids[1]]) is None
    paused_until = _endpoint(settings, URL).paused_until
    assert paused_until is not None
    assert paused_until - utcnow() > timedelta(seconds=55)  # at least its Retry-After
    (second,) = [m for m in messages(settings) if m.id == ids[1]]
    assert (second.attempts, second.next_attempt_at) == (0, paused_until)


def test_recording_an_attempt_waits_for_no_endpoint_lock(settings: Settings) -> None:
    """A 410 locks the endpoint, then its other messages; an attempt's record that held its
    message and then waited for the endpoint (to count a failure) deadlocked with it. The
    attempt's record now never touches the endpoint (that is done afterwards, on its own)."""
    a = _client(settings, "a")
    message_id = _finished_job(settings, URL, a)
    with session_scope(settings) as session:
        session.add(WebhookEndpoint(client_id=a, url=URL))
    prepared = attempt_the_one_due(settings)
    assert prepared.message_id == message_id
    locker = get_sessionmaker(settings)()
    try:
        locker.scalars(select(WebhookEndpoint).with_for_update()).all()  # a 410 in flight
        done: list[str] = []

        def record() -> None:
            with session_scope(settings) as session:
                failed = Outcome("retry", 1.0, 503, "HTTP 503")
                done.append(
                    finish_attempt(
                        session=session, prepared=prepared, outcome=failed, settings=settings
                    )
                )

        recorder = threading.Thread(target=record)
        recorder.start()
        recorder.join(10)
        assert done == ["pending"]  # recorded while the endpoint stayed locked
    finally:
        locker.rollback()
        locker.close()


def test_failures_in_a_row_pause_longer_and_a_delivery_ends_the_run(settings: Settings) -> None:
    cfg = settings.model_copy(
        update={"webhook_schedule": "0,5,300,1800", "webhook_endpoint_pause_max_seconds": 120}
    )
    message_id = _finished_job(cfg, URL, _client(cfg, "a"))
    pauses = []
    for _ in range(3):
        _make_due(cfg, message_id)
        assert attempt(cfg, Outcome("retry", 1.0, None, "refused")) == ["pending"]
        endpoint = _endpoint(cfg, URL)
        assert endpoint.paused_until is not None
        pauses.append((endpoint.paused_until - utcnow()).total_seconds())
    assert 3 < pauses[0] < 7  # the schedule's 5 s (+-10%)
    assert 100 < pauses[1] <= 120  # 300 s, capped
    assert _endpoint(cfg, URL).failures == 3
    _make_due(cfg, message_id)
    assert attempt(cfg, Outcome("delivered", 1.0, 204)) == ["delivered"]
    endpoint = _endpoint(cfg, URL)
    assert (endpoint.failures, endpoint.paused_until) == (0, None)


def test_record_events_started_once_when_job_is_retried(settings: Settings) -> None:
    job_id = make_job(settings, URL, ["start"])
    claimed = start_job(settings, job_id)
    with session_scope(settings) as session:  # a transient failure gives the job back
        job_service.release_job(session=session, job_id=job_id, lease_token=claimed.lease_token)
    start_job(settings, job_id)
    assert [m.event_type for m in messages(settings, job_id)] == ["job.started"]


def test_record_events_in_a_mixed_batch_only_for_subscribed_jobs(settings: Settings) -> None:
    # The claim and the completion skip the outbox query for jobs without a webhook; a batch
    # mixing both must still give each subscribed job exactly its own messages.
    both, default, plain = (
        make_job(settings, URL, ["start", "completed"]),
        make_job(settings, URL),
        make_job(settings, None),
    )
    with session_scope(settings) as session:
        claimed = job_service.claim_jobs(
            session=session, job_ids=[both, default, plain], lease_seconds=60
        )
    assert {job.id for job in claimed} == {both, default, plain}
    assert all(job.model_input and len(job.model_input) == 128 * 128 * 3 for job in claimed)
    results = [
        {
            "id": job.id,
            "lease_token": job.lease_token,
            "mask_png": b"",
            "class_fractions": [0.5, 0.4, 0.1],
            "model_version": "test-v1",
            "queue_ms": 1.0,
            "predict_ms": 2.0,
            "batch_size": 3,
        }
        for job in claimed
    ]
    with session_scope(settings) as session:
        assert len(job_service.complete_jobs(session=session, results=results)) == 3
    got = sorted((m.job_id == both, m.event_type) for m in messages(settings))
    assert got == [(False, "job.completed"), (True, "job.completed"), (True, "job.started")]
    assert not messages(settings, plain)


def test_a_start_recorded_again_after_a_lost_claim_keeps_its_webhook_id(
    settings: Settings,
) -> None:
    """Claims commit without waiting for the WAL: if Postgres crashes after the webhook worker
    sent job.started but before the claim was flushed, the job is claimed and its start recorded
    again. The client must get the same webhook-id, so its deduplication drops the repeat."""
    job_id = make_job(settings, URL, events=["start", "completed"])
    with get_sessionmaker(settings)() as session:  # never committed: the crash lost it
        job_service.claim_jobs(session=session, job_ids=[job_id], lease_seconds=60)
        sent = session.scalars(select(WebhookMessage.id)).one()
        session.rollback()
    finish_job(settings, start_job(settings, job_id))
    started, completed = messages(settings, job_id)
    assert (started.event_type, started.id) == ("job.started", sent)
    assert completed.event_type == "job.completed"
    assert completed.id != started.id
    other = make_job(settings, URL, events=["start"])
    start_job(settings, other)
    assert messages(settings, other)[0].id not in {started.id, completed.id}


def test_two_gone_answers_for_one_endpoint_recorded_at_once_both_land(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each record held its own message and then locked the endpoint and every other pending
    message of it: two 410s at once (a decommissioned receiver answers every delivery thread
    alike) deadlocked, and the loser's attempt went unlogged."""
    a = _client(settings, "a")
    for _ in range(2):
        _finished_job(settings, URL, a)
    with session_scope(settings) as session:
        session.add(WebhookEndpoint(client_id=a, url=URL))
    with session_scope(settings) as session:
        claimed = claim_due(session=session)
    prepared = [start(settings, message_id, lease) for message_id, lease in claimed]
    assert len(prepared) == 2
    assert None not in prepared
    real_next_state = dispatch._next_state

    def held(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # each record holds what it has locked so far: the other catches up
        return real_next_state(*args, **kwargs)

    monkeypatch.setattr(dispatch, "_next_state", held)
    outcomes: list[object] = []

    def gone(p: dispatch.Prepared) -> None:
        try:
            outcomes.append(record(settings, p, Outcome("gone", 1.0, 410)))
        except Exception as exc:  # the outcome is what is checked
            outcomes.append(exc)

    threads = [threading.Thread(target=gone, args=(p,)) for p in prepared]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes == ["failed", "failed"]
    with session_scope(settings) as session:
        assert len(session.scalars(select(WebhookAttempt)).all()) == 2
    assert _endpoint(settings, URL).disabled_at is not None


def test_a_redeliver_waiting_for_the_endpoint_holds_no_message_lock(settings: Settings) -> None:
    """Endpoint first, then message, as every writer of both: a redeliver that locked its
    message and then waited for the endpoint deadlocked with a 410 being recorded (which holds
    the endpoint and disables the endpoint's pending messages)."""
    a = _client(settings, "a")
    message_id = _finished_job(settings, URL, a)
    job_id = messages(settings)[0].job_id
    with session_scope(settings) as session:
        session.add(WebhookEndpoint(client_id=a, url=URL))
    locker = get_sessionmaker(settings)()
    done: list[object] = []
    try:
        locker.scalars(select(WebhookEndpoint).with_for_update()).all()  # a 410 being recorded

        def redeliver() -> None:
            with session_scope(settings) as session:
                webhook_service.redeliver(
                    session=session, job_id=str(job_id), message_id=message_id, client_id=a
                )
            done.append("redelivered")

        thread = threading.Thread(target=redeliver)
        thread.start()
        thread.join(0.5)
        assert done == []  # waiting for the endpoint...
        probe = get_sessionmaker(settings)()
        try:  # ...without holding the message the 410's record must disable
            locked = probe.execute(
                select(WebhookMessage.id)
                .where(WebhookMessage.id == message_id)
                .with_for_update(skip_locked=True)
            ).all()
            assert locked == [(message_id,)], "the waiting redeliver held the message's lock"
        finally:
            probe.rollback()
            probe.close()
    finally:
        locker.rollback()
        locker.close()
    thread.join(10)
    assert done == ["redelivered"]


def _failing_endpoint_with_backlog(settings: Settings, n: int) -> tuple[uuid.UUID, list[str]]:
    """A client with `n` due messages to URL, whose endpoint failed 3 times in a row and whose
    pause has just ended."""
    a = _client(settings, "a")
    ids = [_finished_job(settings, URL, a) for _ in range(n)]
    with session_scope(settings) as session:
        session.add(
            WebhookEndpoint(
                client_id=a, url=URL, failures=3, paused_until=utcnow() - timedelta(seconds=1)
            )
        )
    return a, ids


def _start_all_due(settings: Settings) -> list[dispatch.Prepared]:
    with session_scope(settings) as session:
        claimed = claim_due(session=session)
    started = (start(settings, message_id, lease) for message_id, lease in claimed)
    return [prepared for prepared in started if prepared is not None]


def test_a_failing_endpoint_whose_pause_ends_gets_one_probe_not_its_whole_backlog(
    settings: Settings,
) -> None:
    """At the end of each pause every due message of a still-dead receiver was claimed and
    started at once: all delivery threads waited out its timeout, and other clients' notices
    queued behind them."""
    _, ids = _failing_endpoint_with_backlog(settings, 8)
    (probe,) = _start_all_due(settings)
    assert _start_all_due(settings) == []  # the rest wait for the probe's outcome
    timed_out = Outcome("retry", 15000.0, None, "timed out after 15 s")
    assert record(settings, probe, timed_out) == "pending"
    endpoint = _endpoint(settings, URL)
    assert endpoint.failures == 4
    assert endpoint.paused_until is not None
    waiting = [m for m in messages(settings) if m.id != probe.message_id]
    assert {m.next_attempt_at for m in waiting} == {endpoint.paused_until}  # the new pause
    assert {m.attempts for m in waiting} == {0}
    # The pause ends again; this time the probe is delivered: the rest go at once.
    with session_scope(settings) as session:
        session.execute(
            update(WebhookEndpoint).values(paused_until=utcnow() - timedelta(seconds=1))
        )
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id.in_([m.id for m in waiting]))
            .values(next_attempt_at=utcnow())
        )
    (second_probe,) = _start_all_due(settings)
    assert record(settings, second_probe, Outcome("delivered", 1.0, 204)) == "delivered"
    assert (_endpoint(settings, URL).failures, _endpoint(settings, URL).paused_until) == (0, None)
    # The probe's outcome let the others go (the first probe keeps its own retry time).
    assert len(_start_all_due(settings)) == len(ids) - 2


def test_a_redeliver_ends_a_long_pause_the_receiver_asked_for(settings: Settings) -> None:
    """A 503 with Retry-After: 3600 paused the endpoint for an hour, and a redeliver asked
    for "now" waited that hour."""
    a = _client(settings, "a")
    message_id = _finished_job(settings, URL, a)
    job_id = messages(settings)[0].job_id
    prepared = attempt_the_one_due(settings)
    busy = Outcome("retry", 1.0, 503, "HTTP 503", retry_after="3600")
    assert record(settings, prepared, busy) == "pending"
    paused_until = _endpoint(settings, URL).paused_until
    assert paused_until is not None
    assert paused_until - utcnow() > timedelta(minutes=59)
    with session_scope(settings) as session:
        webhook_service.redeliver(
            session=session, job_id=str(job_id), message_id=message_id, client_id=a
        )
    assert [p.message_id for p in _start_all_due(settings)] == [message_id]


def test_a_probe_whose_target_is_refused_lets_the_endpoints_backlog_go(
    settings: Settings,
) -> None:
    """An outcome that neither fails nor recovers the endpoint (the URL now resolves to a
    private address: failed at once) left the probe's pause in place, and the backlog waited
    out the probe's lease for nothing."""
    _failing_endpoint_with_backlog(settings, 4)
    (probe,) = _start_all_due(settings)
    refused = Outcome("failed", 1.0, None, "resolves to a private address")
    assert record(settings, probe, refused) == "failed"
    assert _endpoint(settings, URL).paused_until is None
    assert len(_start_all_due(settings)) == 1  # the next probe, at once


def test_a_410_disables_its_endpoint_in_the_attempts_own_transaction(settings: Settings) -> None:
    """Disabled in a second transaction whose errors were only logged, a 410 could be recorded
    while its endpoint stayed enabled (a crash or a database blip in between), and the
    promise that nothing more is sent to that URL broke."""
    first = _finished_job(settings, URL, _client(settings, "a"))
    prepared = attempt_the_one_due(settings)
    assert prepared.message_id == first
    with session_scope(settings) as session:  # the attempt's record only
        status = finish_attempt(
            session=session, prepared=prepared, outcome=Outcome("gone", 1.0, 410), settings=settings
        )
    assert status == "failed"
    assert _endpoint(settings, URL).disabled_at is not None


def _all_due_now(settings: Settings) -> None:
    """Every pause ends and every pending message is due (time passes for all of them)."""
    with session_scope(settings) as session:
        session.execute(update(WebhookEndpoint).values(paused_until=None))
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.status == "pending")
            .values(next_attempt_at=utcnow())
        )


def test_a_delivery_after_a_redeliver_lets_the_put_off_backlog_go(settings: Settings) -> None:
    """A probe answered 503 with Retry-After of a day put the endpoint's backlog off a day; the
    receiver was fixed and a redelivered message delivered, which ends the run ("lets them all
    go at once"), yet the backlog, never attempted, still waited the day."""
    client = _client(settings, "backlog")
    ids = [_finished_job(settings, URL, client) for _ in range(3)]
    with session_scope(settings) as session:
        claimed = claim_due(session=session)
    first = start(settings, *claimed[0])
    assert first is not None
    record(settings, first, Outcome("retry", 10.0, 500, "HTTP 500"))
    assert [start(settings, *c) for c in claimed[1:]] == [None, None]  # put off to the pause
    _all_due_now(settings)
    with session_scope(settings) as session:
        claimed = claim_due(session=session)
    probe = start(settings, *claimed[0])
    assert probe is not None
    assert [start(settings, *c) for c in claimed[1:]] == [None, None]  # waiting for the probe
    record(settings, probe, Outcome("retry", 10.0, 503, "HTTP 503", retry_after="86400"))
    backlog = {c[0] for c in claimed[1:]}
    redelivered = sorted(backlog)[0]
    with session_scope(settings) as session:
        message = session.get(WebhookMessage, redelivered)
        assert message is not None
        webhook_service.redeliver(
            session=session, job_id=str(message.job_id), message_id=redelivered, client_id=client
        )
    with session_scope(settings) as session:
        (again,) = claim_due(session=session)
    prepared = start(settings, *again)
    assert prepared is not None
    assert record(settings, prepared, Outcome("delivered", 5.0, 200)) == "delivered"
    with session_scope(settings) as session:
        due = {message_id for message_id, _ in claim_due(session=session)}
        rows = {m: session.get(WebhookMessage, m) for m in backlog - {redelivered}}
    # Let go: a message never attempted is due now; one attempted before the pause (the first
    # claimed, when the probe was another) keeps its own retry time (`scheduled_at`), seconds
    # away, not the day the 503 put the backlog off by.
    for message_id, row in rows.items():
        assert row is not None
        if row.attempts == 0:
            assert message_id in due
        else:
            assert row.scheduled_at is not None
            assert row.next_attempt_at == row.scheduled_at
            assert row.next_attempt_at < utcnow() + timedelta(hours=1)
    assert set(ids) >= due


def test_a_message_never_attempted_is_not_sent_past_its_max_age(settings: Settings) -> None:
    """Put off pause after pause while its receiver was down, a message that never got an
    attempt was sent once it recovered, days past SEG_WEBHOOK_MAX_AGE_SECONDS."""
    client = _client(settings, "late")
    message_id = _finished_job(settings, URL, client)
    with session_scope(settings) as session:
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id == message_id)
            .values(created_at=utcnow() - timedelta(seconds=settings.webhook_max_age_seconds + 60))
        )
    with session_scope(settings) as session:
        (claimed,) = claim_due(session=session)
    assert start(settings, *claimed) is None
    with session_scope(settings) as session:
        message = session.get(WebhookMessage, message_id)
        assert message is not None
        assert (message.status, message.attempts, message.next_attempt_at) == ("failed", 0, None)


def test_a_message_for_a_paused_endpoint_is_due_when_the_pause_ends(settings: Settings) -> None:
    """A message recorded while its endpoint is paused was due at once: every dispatcher poll
    read it (and the rest of that pause's arrivals) before dropping it as paused. It is due
    at the pause's end; another client's messages to the same URL are due at once."""
    until = utcnow() + timedelta(minutes=10)
    with session_scope(settings) as session:
        session.add(WebhookEndpoint(client_id=None, url=URL, failures=5, paused_until=until))
        other, _ = create_key(session=session, name="other")
        other_id = other.id
    paused_job, other_job = make_job(settings, URL), make_job(settings, URL, client_id=other_id)
    finish_job(settings, start_job(settings, paused_job))
    finish_job(settings, start_job(settings, other_job))
    (paused,) = messages(settings, paused_job)
    (unpaused,) = messages(settings, other_job)
    assert paused.status == unpaused.status == "pending"
    assert paused.next_attempt_at == until
    assert unpaused.next_attempt_at is not None
    assert unpaused.next_attempt_at < until - timedelta(minutes=5)
    with session_scope(settings) as session:
        claimed = {message_id for message_id, _ in claim_due(session=session)}
    assert claimed == {unpaused.id}
