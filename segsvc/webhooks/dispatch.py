"""The delivery lifecycle on Postgres: claim due messages, prepare an attempt, record it.

Postgres is the source of truth; the broker only carries "try message X now" hints. A claim
moves `next_attempt_at` forward (a lease), so a lost hint or a dead worker only delays a
message until the lease runs out and the dispatcher claims it again.

Leases and retry times are granted and judged on the database's clock (`models.db_now`), like
the jobs' leases: a worker whose clock runs fast neither takes over a live attempt nor retries
early, and one that runs slow neither leaves due messages waiting nor retries late.

Locks are taken endpoint first, then messages (`start_attempt`, `record_endpoint_outcome`, and
`services.webhooks.redeliver`); `finish_attempt` locks its own message and no endpoint. Taken
the other way round by one writer, two 410s for one endpoint recorded at once deadlocked.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, any_, case, exists, func, literal, null, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from segsvc.db import savepoint
from segsvc.models import (
    Job,
    UTCDateTime,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookMessage,
    db_now,
    db_time,
    utcnow,
)
from segsvc.serialize import iso, job_urls
from segsvc.services.webhooks import signing_secrets
from segsvc.settings import Settings
from segsvc.webhooks import outbox
from segsvc.webhooks.delivery import Outcome
from segsvc.webhooks.schedule import (
    next_attempt_at,
    next_delay,
    parse_retry_after,
    parse_schedule,
)
from segsvc.webhooks.signing import encode_body, sign_headers

DISPATCH_LEASE_S = 60.0  # how long a dispatched hint may wait in the broker before a re-send
# The due messages one claim judges, oldest first (`claim_due`): room for a poll's 100 past
# the handful that wait for their job's earlier message, or for a paused endpoint's sweep.
CLAIM_WINDOW = 1000
# Windows of paused endpoints' due messages one claim moves at most before it claims (about
# 25 ms each): a backlog larger than this keeps the claims of the next polls on it.
SWEEP_ROUNDS = 10
# The messages a pause or a probe moves under its endpoint's lock (`_move_backlog`), about
# 0.1 s of it; the claims move the rest of a larger backlog as it comes due.
MOVE_CHUNK = 5000


@dataclass(frozen=True)
class Prepared:
    """A claimed message, signed and ready for one attempt (`job_id`, `request_id`: its job's
    and the submit's, for logs)."""

    message_id: str
    lease: datetime
    url: str
    body: str
    headers: dict[str, str]
    client_id: uuid.UUID | None = None
    job_id: uuid.UUID | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Ended:
    """A claimed message that `start_attempt` ended without an attempt, with its final status:
    `disabled` (its endpoint answered 410 Gone), `failed` (past its max age). The caller counts
    it once the transaction has committed."""

    message_id: str
    job_id: uuid.UUID
    status: str
    request_id: str | None = None


class Recorded(str):
    """`finish_attempt`'s answer: the message's status after the attempt, a plain `str` to
    every caller as before (`delivered`, `pending`, `failed`, `disabled`; `superseded`, `gone`),
    and `ended`: the messages that its transaction ended, by final status, for the caller to
    count once that transaction has committed (this message when it ended here, and those of
    its endpoint that a 410 Gone disabled with it)."""

    ended: dict[str, int]

    def __new__(cls, status: str, ended: dict[str, int] | None = None) -> Recorded:
        recorded = super().__new__(cls, status)
        recorded.ended = {k: n for k, n in (ended or {}).items() if n}
        return recorded


def base_url(settings: Settings) -> str:
    """The public base URL for links in payloads."""
    return (settings.public_url or f"http://127.0.0.1:{settings.port}").rstrip("/")


def attempt_lease(settings: Settings) -> timedelta:
    """Longer than any attempt can take (connect, write and read each get the timeout)."""
    return timedelta(seconds=4 * settings.webhook_timeout_seconds + 30)


def _endpoint_of(
    client_id: uuid.UUID | InstrumentedAttribute[uuid.UUID | None] | None,
    url: str | InstrumentedAttribute[str],
) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """The conditions that match the endpoint row of (client, url): values, or a message's
    columns in a correlated query. The anonymous client's is the row whose client is NULL."""
    return (
        WebhookEndpoint.url == url,
        WebhookEndpoint.client_id.is_not_distinct_from(client_id),
    )


def claim_due(*, session: Session, limit: int = 100) -> list[tuple[str, datetime]]:
    """Lease due messages for dispatch: (id, lease) pairs, oldest due first.

    A message waits while an earlier message of its job has not had its first attempt, so
    `job.started` reaches a healthy receiver before `job.completed`; and while its endpoint is
    paused after failing (`_endpoint_failed`), so a receiver that times out holds no delivery
    thread but its own, and no other client's notices queue behind its backlog.

    Both conditions are judged on the CLAIM_WINDOW messages due first only, taken in the
    order of `ix_webhook_messages_status_next` before any join: asked for the whole due range,
    the planner took a paused endpoint's anti-join (IS NOT DISTINCT FROM) for one row, and
    read and sorted the whole backlog every poll (1.6 s for 100k due, on a plan that statistics
    choose). A paused endpoint's messages in that window are first moved to its pause's end
    (`_sweep_paused`), a bounded chunk at a time, so its backlog at the head of the due range
    cannot hide every other client's messages behind it: a pause (`record_endpoint_outcome`)
    and a probe (`start_attempt`) move at most MOVE_CHUNK of it under the endpoint's lock, and
    the claims move the rest as it comes due.
    """
    due = _due(WebhookMessage, db_now(session))
    for _ in range(SWEEP_ROUNDS):
        if not _sweep_paused(session):
            break
    earlier = aliased(WebhookMessage)
    blocked = exists().where(
        earlier.job_id == WebhookMessage.job_id,
        earlier.status == outbox.PENDING,
        earlier.attempts == 0,
        earlier.created_at < WebhookMessage.created_at,
    )
    paused = exists().where(
        *_endpoint_of(WebhookMessage.client_id, WebhookMessage.url),
        WebhookEndpoint.paused_until > db_now(session),
    )
    ids = session.scalars(
        select(WebhookMessage.id)
        .where(_in_due_head(session), *due, ~blocked, ~paused)
        .order_by(WebhookMessage.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=WebhookMessage)
    ).all()
    if not ids:
        return []
    claimed = session.execute(
        update(WebhookMessage)
        .where(WebhookMessage.id.in_(ids), *due)
        .values(next_attempt_at=db_now(session, plus_seconds=DISPATCH_LEASE_S))
        .returning(WebhookMessage.id, WebhookMessage.next_attempt_at)
        .execution_options(synchronize_session=False)
    ).all()
    rank = {message_id: i for i, message_id in enumerate(ids)}  # RETURNING keeps no order
    return sorted(((m, _stamp(lease)) for m, lease in claimed), key=lambda c: rank[c[0]])


def _due(
    message: type[WebhookMessage], now: ColumnElement[datetime]
) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """The conditions of a due message (or an alias's): `ix_webhook_messages_status_next`."""
    return message.status == outbox.PENDING, message.next_attempt_at <= now


def _in_due_head(session: Session) -> ColumnElement[bool]:
    """Whether a message is one of the CLAIM_WINDOW due first, walked in the due index's
    order. Its LIMIT keeps that walk a subquery of its own, which stops after CLAIM_WINDOW
    rows whatever the statistics say of the joins that follow; on Postgres its ids are an
    array that the primary key's index looks up (as `IN (...)`, a table of 20k messages was
    read whole for a hash join; of 500k, a bad estimate would do the same)."""
    head = aliased(WebhookMessage, name="head")
    first = (
        select(head.id)
        .where(*_due(head, db_now(session)))
        .order_by(head.next_attempt_at)
        .limit(CLAIM_WINDOW)
    )
    if session.get_bind().dialect.name != "postgresql":
        return WebhookMessage.id.in_(first)
    return WebhookMessage.id == any_(func.array(first.scalar_subquery()))


def _sweep_paused(session: Session) -> int:
    """Move the due messages of paused endpoints among the CLAIM_WINDOW due first to their
    endpoint's pause end (or their own retry time, if later): how many it moved.

    Locked SKIP LOCKED, not waited for: the claim takes no endpoint lock, so waiting here for
    a message that an endpoint's writer (endpoint, then messages) holds could close a cycle.
    The endpoint's row is read, not locked: a pause that ends (a delivery's let-go) as this
    commits leaves these at most until the old pause's end."""
    now = db_now(session)
    found = session.execute(
        select(WebhookMessage.id, WebhookEndpoint.paused_until)
        .join(WebhookEndpoint, and_(*_endpoint_of(WebhookMessage.client_id, WebhookMessage.url)))
        .where(
            _in_due_head(session),
            *_due(WebhookMessage, now),
            WebhookEndpoint.paused_until > now,
        )
        .with_for_update(skip_locked=True, of=WebhookMessage)
    ).all()
    ends: dict[datetime, list[str]] = {}
    for message_id, paused_until in found:
        ends.setdefault(_stamp(paused_until), []).append(message_id)
    for end, ids in ends.items():
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id.in_(ids), *_due(WebhookMessage, now))
            .values(next_attempt_at=_later_of_own_and(end))
            .execution_options(synchronize_session=False)
        )
    return len(found)


# Pending messages never attempted that one `expire_unattempted` call fails at most: one
# transaction's locks.
EXPIRE_CHUNK = 1000


def expire_unattempted(*, session: Session, settings: Settings, limit: int = EXPIRE_CHUNK) -> int:
    """Fail up to `limit` pending messages past their max age that were never attempted (nor
    redelivered since): what `start_attempt` does to each when a claim hands it one, here in
    bulk. A receiver that is down gets no attempt but its probes, so its backlog ended a
    handful per claim, and a busy client's outgrew its max age. The count ended; the caller
    counts them once committed.

    A message that may be leased (due within an attempt's lease: claimed, or its first
    attempt's POST under way, which holds no row lock) is left to the attempt, whose outcome
    `finish_attempt` records: failed here meanwhile, a notice the receiver took stayed failed.
    `start_attempt` ends it if its lease runs out unattempted, or a later run does. Rows
    another transaction holds are skipped."""
    leased_for = max(attempt_lease(settings).total_seconds(), DISPATCH_LEASE_S)
    over_age = select(WebhookMessage.id).where(
        WebhookMessage.status == outbox.PENDING,
        WebhookMessage.attempts == 0,
        WebhookMessage.redelivered_at.is_(None),
        WebhookMessage.created_at
        <= db_now(session, plus_seconds=-float(settings.webhook_max_age_seconds)),
        or_(
            WebhookMessage.next_attempt_at <= db_now(session),
            WebhookMessage.next_attempt_at > db_now(session, plus_seconds=leased_for),
        ),
    )
    ids = session.scalars(
        over_age.order_by(WebhookMessage.created_at).limit(limit).with_for_update(skip_locked=True)
    ).all()
    if not ids:
        return 0
    ended = session.scalars(
        update(WebhookMessage)
        .where(WebhookMessage.id.in_(ids), WebhookMessage.status == outbox.PENDING)
        .values(status=outbox.FAILED, next_attempt_at=None, completed_at=db_now(session))
        .returning(WebhookMessage.id)
        .execution_options(synchronize_session=False)
    ).all()
    return len(ended)


def start_attempt(
    *, session: Session, message_id: str, lease: datetime, settings: Settings
) -> Prepared | Ended | None:
    """Take the message for one attempt (None if another worker has it or it is done, or its
    endpoint is paused or already being probed; `Ended` if it ends here, unattempted: its
    endpoint disabled, or past its max age)."""
    found = session.execute(  # which endpoint to lock first; no lock on the message yet
        select(WebhookMessage.client_id, WebhookMessage.url, Job.request_id)
        .outerjoin(Job, Job.id == WebhookMessage.job_id)
        .where(WebhookMessage.id == message_id)
    ).first()
    if found is None:
        return None
    endpoint = outbox.find_endpoint(
        session=session, client_id=found.client_id, url=found.url, lock=True
    )
    new_lease = session.scalar(
        update(WebhookMessage)
        .where(
            WebhookMessage.id == message_id,
            WebhookMessage.status == outbox.PENDING,
            WebhookMessage.next_attempt_at == lease,
        )
        .values(
            next_attempt_at=db_now(session, plus_seconds=attempt_lease(settings).total_seconds())
        )
        .returning(WebhookMessage.next_attempt_at)
        .execution_options(synchronize_session=False)
    )
    message = session.get(WebhookMessage, message_id, populate_existing=True) if new_lease else None
    if message is None:
        return None
    if endpoint is not None and endpoint.disabled_at is not None:
        message.status, message.next_attempt_at = outbox.DISABLED, None
        return Ended(message.id, message.job_id, outbox.DISABLED, found.request_id)
    now = _stamp(new_lease) - attempt_lease(settings)  # the lease's statement time: no read
    redelivered = message.redelivered_at is not None and (
        message.last_attempt_at is None or message.last_attempt_at < message.redelivered_at
    )
    if (
        message.created_at + timedelta(seconds=settings.webhook_max_age_seconds) <= now
        and not redelivered
    ):
        # Past its max age without an attempt (put off pause after pause while its receiver
        # was down): not sent days late. Attempted ones end by `_next_state`'s check. A
        # client's redeliver asked for it now, whatever its age: its attempt is made.
        message.status, message.next_attempt_at, message.completed_at = outbox.FAILED, None, now
        return Ended(message.id, message.job_id, outbox.FAILED, found.request_id)
    if endpoint is not None and endpoint.failures > 0:
        paused_until = endpoint.paused_until
        if paused_until is not None and paused_until > now:
            # Paused since this hint was sent, or another message is this failing endpoint's
            # probe: no attempt, and none counted.
            message.next_attempt_at = paused_until
            return None
        # The first attempt after a pause is the endpoint's probe, and the only one: paused
        # for its lease, the endpoint's other messages wait for its outcome (one delivery
        # thread on a receiver that still times out, not one per message of its backlog).
        # `record_endpoint_outcome` then ends or renews the pause.
        endpoint.paused_until = new_lease
        # A probe started: the endpoint's other due messages (none in flight) wait for its
        # outcome, out of the claim's index range meanwhile, rather than due and dropped by
        # every claim's anti-join.
        _move_backlog(
            session,
            message.client_id,
            message.url,
            but=message.id,
            which=WebhookMessage.next_attempt_at <= db_now(session),
            to=_stamp(new_lease),
        )
    data = {**message.payload, "urls": job_urls(message.job_id, base_url=base_url(settings))}
    body = encode_body(
        {"type": message.event_type, "timestamp": iso(message.created_at), "data": data}
    )
    keys = [row.secret for row in signing_secrets(session=session, client_id=message.client_id)]
    # The signature's timestamp is this host's clock: the receiver checks it against its own.
    headers = sign_headers(msg_id=message.id, timestamp=utcnow(), body=body, keys=keys)
    return Prepared(
        message.id,
        _stamp(new_lease),
        message.url,
        body,
        headers,
        message.client_id,
        message.job_id,
        found.request_id,
    )


def finish_attempt(
    *, session: Session, prepared: Prepared, outcome: Outcome, settings: Settings
) -> Recorded:
    """Log the attempt and move the message on: delivered, retry later, failed or disabled.
    A 410 Gone disables the endpoint and its pending messages in the same transaction, its
    endpoint locked before its message (the order every writer of both keeps)."""
    now = db_time(session)  # the next attempt's time is judged by `claim_due`, on that clock
    endpoint = None
    if outcome.kind == "gone":
        endpoint = _endpoint_row(session, prepared.client_id, prepared.url)
        session.refresh(endpoint, with_for_update=True)
    # Locked from this read to the commit: a redeliver in between would otherwise be written
    # over with this attempt's outcome (it waits instead, and then stands).
    message = session.get(
        WebhookMessage, prepared.message_id, populate_existing=True, with_for_update=True
    )
    if message is None:  # the job (and its messages) was deleted meanwhile
        return Recorded("gone")
    # Disabled while this attempt was in flight (another message's 410 disabled the endpoint):
    # the attempt still counts, and the message stays disabled unless this one ended it.
    disabled_meanwhile = message.status == outbox.DISABLED
    superseded = not disabled_meanwhile and (
        message.status != outbox.PENDING or message.next_attempt_at != prepared.lease
    )
    status, when = _next_state(message, outcome, now, settings)
    if disabled_meanwhile and status == outbox.PENDING:
        status, when = outbox.DISABLED, None
    session.add(
        WebhookAttempt(
            message_id=message.id,
            status_code=outcome.status_code,
            attempted_at=now - timedelta(milliseconds=outcome.duration_ms),
            duration_ms=outcome.duration_ms,
            error=outcome.error,
            response_body=outcome.body,
            next_attempt_at=None if superseded else when,
        )
    )
    if superseded:  # redelivered or re-claimed meanwhile: only log this attempt...
        disabled = 0
        if endpoint is not None:
            # ...but a 410 Gone still disables the endpoint and the redelivered copy, which
            # would only be answered 410 again
            disabled = _disable_endpoint(session, endpoint, prepared, now)
        session.flush()
        return Recorded("superseded", {outbox.DISABLED: disabled})
    message.attempts += 1
    message.last_attempt_at = now
    message.status, message.next_attempt_at = status, when
    message.scheduled_at = when  # its own time, which a pause may put off but not bring forward
    if status != outbox.PENDING:
        message.completed_at = now
    # Ended here, unless it had ended already (disabled meanwhile: counted where it was).
    ended = {status: 1} if status != outbox.PENDING and not disabled_meanwhile else {}
    if endpoint is not None:
        others = _disable_endpoint(session, endpoint, prepared, now)
        ended[outbox.DISABLED] = ended.get(outbox.DISABLED, 0) + others
    session.flush()
    return Recorded(status, ended)


def record_endpoint_outcome(
    *, session: Session, prepared: Prepared, outcome: Outcome, settings: Settings
) -> None:
    """After `finish_attempt` committed, in a transaction of its own that locks the endpoint
    before any message: count a failure to try again and pause the endpoint, or end its run
    of failures after a delivery. The messages that waited for this attempt as the endpoint's
    probe (`start_attempt`) are let go: now after a delivery (or an outcome that says nothing
    of the endpoint, such as a refused target), at the end of the new pause after a failure.
    A 410's disabling is `finish_attempt`'s, in the attempt's own transaction."""
    if outcome.kind == "retry":
        opens = _endpoint_failed(session, prepared, outcome, settings)
    elif outcome.kind == "delivered":
        opens = _endpoint_recovered(session, prepared)
    else:
        opens = _probe_over(session, prepared)
    put_off = WebhookMessage.next_attempt_at == prepared.lease  # to the probe's end
    if outcome.kind == "retry":
        # The whole backlog waits for the pause's end past the claim's index range: left due,
        # every claim (each worker's, every second) read it all before its anti-join dropped
        # it. Any due within a lease of now is left as it is: it may be one in flight.
        lease = attempt_lease(settings).total_seconds()
        put_off = or_(
            put_off,
            and_(
                WebhookMessage.next_attempt_at < opens,
                or_(
                    WebhookMessage.next_attempt_at <= db_now(session),
                    WebhookMessage.next_attempt_at > db_now(session, plus_seconds=lease),
                ),
            ),
        )
    if outcome.kind == "delivered":
        # The run is over: the messages an earlier pause put off past their own time go now
        # too (a long Retry-After kept the backlog a day after a redelivery was delivered), each
        # no earlier than its own retry time (`_move_backlog`). Those that their own backoff
        # scheduled far ahead stay: a message that kept failing on its own (a receiver that
        # answers 400 to job.started, 204 to job.completed) was otherwise tried again after
        # every delivery to its endpoint, each time pausing it, for its whole max age. Any due
        # within a lease of now is left as it is: it may be one in flight.
        lease = attempt_lease(settings).total_seconds()
        own = _own_retry_time()
        put_off = or_(
            put_off,
            and_(
                WebhookMessage.next_attempt_at > db_now(session, plus_seconds=lease),
                or_(own.is_(None), own < WebhookMessage.next_attempt_at),
            ),
        )
    _move_backlog(
        session,
        prepared.client_id,
        prepared.url,
        but=prepared.message_id,
        which=put_off,
        to=opens,
        chunk=None if outcome.kind == "delivered" else MOVE_CHUNK,
    )


def _move_backlog(
    session: Session,
    client_id: uuid.UUID | None,
    url: str,
    *,
    but: str,
    which: ColumnElement[bool],
    to: datetime,
    chunk: int | None = MOVE_CHUNK,
) -> None:
    """Make the endpoint's pending messages that `which` picks (all but message `but`) due at
    `to`, or at their own retry time if that is later: held for a probe's outcome, put off to a
    pause's end, or let go. A pause only ever delays a message; it never brings one forward.

    The endpoint's row is locked meanwhile, and other delivery threads with a hint for it wait
    on that lock: a pause or a probe moves the `chunk` due first only (one UPDATE of 300k
    messages took 8-12 s, and one large enough would pass the statement timeout and fail the
    probe for good). The rest stay due and paused, and the claims move them, a bounded window
    at a time, as they reach the head of the due range (`claim_due`). `chunk` None: all of
    them (a delivery's let-go, once per run of failures: what it leaves would wait on)."""
    conditions = (
        *_messages_of(client_id, url),
        WebhookMessage.status == outbox.PENDING,
        which,
        WebhookMessage.id != but,
    )
    if chunk is not None:
        # The endpoint's index range (client, url, next_attempt_at) in order, cut at `chunk`:
        # a subquery of its own (not correlated with the UPDATE's table).
        first = (
            select(WebhookMessage.id)
            .where(*conditions)
            .order_by(WebhookMessage.next_attempt_at)
            .limit(chunk)
            .correlate(None)
        )
        conditions = (*conditions, WebhookMessage.id.in_(first))
    session.execute(
        update(WebhookMessage)
        .where(*conditions)
        .values(next_attempt_at=_later_of_own_and(to))
        .execution_options(synchronize_session=False)
    )


def _later_of_own_and(to: datetime) -> ColumnElement[datetime | None]:
    """`to`, or a message's own retry time if that is later (`_own_retry_time`)."""
    own = _own_retry_time()
    return case((own > literal(to, UTCDateTime()), own), else_=literal(to, UTCDateTime()))


def _own_retry_time() -> ColumnElement[datetime | None]:
    """A message's own next time, as its backoff set it (`finish_attempt`), apart from the
    pauses of its endpoint that move `next_attempt_at`; NULL if it has none: never attempted
    (its own time is its creation), redelivered since its last attempt (a client asked for it
    now, and `services.webhooks.redeliver` leaves `scheduled_at` as it was), or attempted only
    before migration 0013 (let go by a delivery as before, once).

    Kept in the message's row, not inferred from its endpoint's (say, "due at the pause end
    the endpoint recorded", or "never attempted"): each UPDATE of `_move_backlog` decides and
    writes from one version of the row (Postgres re-checks a row that a concurrent attempt's
    record changed against its newest version), so a message's own time and its due time
    cannot come apart however several webhook workers interleave; while an endpoint's pause
    end is lengthened by concurrent failures and cleared by a redeliver, and a rule on
    `attempts` keeps the attempted messages a long Retry-After put off waiting it out. The
    UPDATEs still find the endpoint's messages by `ix_webhook_messages_pending_endpoint`
    (client, url, next_attempt_at): this only filters the rows that index range yields."""
    message = WebhookMessage
    return case(
        (
            or_(
                message.redelivered_at.is_(None),
                message.last_attempt_at >= message.redelivered_at,
            ),
            message.scheduled_at,
        ),
        else_=null(),
    )


def _endpoint_failed(
    session: Session, prepared: Prepared, outcome: Outcome, settings: Settings
) -> datetime:
    """A failure to try again (a timeout, a refused connection, any answer but 2xx or 410):
    pause every message of the endpoint, for longer with each failure in a row (the retry
    schedule, at most SEG_WEBHOOK_ENDPOINT_PAUSE_MAX_SECONDS, and at least its Retry-After).
    Its messages then wait unclaimed instead of each holding a delivery thread for the whole
    timeout; once the pause ends they are tried again, and the first success
    (`_endpoint_recovered`) ends the run."""
    now = db_time(session)
    endpoint = _endpoint_row(session, prepared.client_id, prepared.url)
    session.refresh(endpoint, with_for_update=True)  # failures of concurrent attempts add up
    probe = endpoint.paused_until == prepared.lease  # this attempt was the endpoint's probe
    endpoint.failures += 1
    scheduled = next_delay(
        attempts_made=endpoint.failures, schedule=parse_schedule(settings.webhook_schedule)
    )
    asked = parse_retry_after(outcome.retry_after, now=now) or 0.0
    pause = max(
        min(scheduled, settings.webhook_endpoint_pause_max_seconds),
        min(asked, float(settings.webhook_max_age_seconds)),  # past that, nothing is sent
    )
    until = now + timedelta(seconds=pause)
    # Concurrent failures only lengthen a pause; the probe's own (its lease) is replaced.
    if probe or endpoint.paused_until is None or endpoint.paused_until < until:
        endpoint.paused_until = until
    return endpoint.paused_until


def _probe_over(session: Session, prepared: Prepared) -> datetime:
    """An outcome that neither fails nor recovers the endpoint: if this attempt was its probe,
    its pause (the probe's lease) ends now."""
    session.execute(
        update(WebhookEndpoint)
        .where(
            *_endpoint_of(prepared.client_id, prepared.url),
            WebhookEndpoint.paused_until == prepared.lease,
        )
        .values(paused_until=None)
        .execution_options(synchronize_session=False)
    )
    return db_time(session)


def _endpoint_recovered(session: Session, prepared: Prepared) -> datetime:
    """A delivery: the endpoint works, so its run of failures (and any pause) is over."""
    session.execute(
        update(WebhookEndpoint)
        .where(*_endpoint_of(prepared.client_id, prepared.url), WebhookEndpoint.failures > 0)
        .values(failures=0, paused_until=None)
        .execution_options(synchronize_session=False)
    )
    return db_time(session)


def _stamp(value: datetime | None) -> datetime:
    """A lease read back from its row (never NULL: it was just written)."""
    assert value is not None
    return value


def _next_state(
    message: WebhookMessage, outcome: Outcome, now: datetime, settings: Settings
) -> tuple[str, datetime | None]:
    if outcome.kind == "delivered":
        return outbox.DELIVERED, None
    if outcome.kind != "retry":
        return outbox.FAILED, None
    when = next_attempt_at(
        now=now,
        created_at=message.created_at,
        attempts_made=message.attempts + 1,
        schedule=parse_schedule(settings.webhook_schedule),
        max_age_seconds=settings.webhook_max_age_seconds,
        retry_after=parse_retry_after(outcome.retry_after, now=now),
    )
    return (outbox.PENDING, when) if when is not None else (outbox.FAILED, None)


def _endpoint_row(session: Session, client_id: uuid.UUID | None, url: str) -> WebhookEndpoint:
    """The endpoint row of (client, url), created if there is none. Two writers for one URL
    at once both find none: the second insert loses the unique index, in a savepoint, and
    reads the winner's row instead of failing."""
    found = outbox.find_endpoint(session=session, client_id=client_id, url=url)
    if found is not None:
        return found
    try:
        with savepoint(session):
            endpoint = WebhookEndpoint(client_id=client_id, url=url)
            session.add(endpoint)
            session.flush()
        return endpoint
    except IntegrityError:
        found = outbox.find_endpoint(session=session, client_id=client_id, url=url)
        if found is None:
            raise
        return found


def _messages_of(client_id: uuid.UUID | None, url: str) -> tuple[ColumnElement[bool], ...]:
    """The conditions that match the messages of the endpoint (client, url); with the status
    pending, `ix_webhook_messages_pending_endpoint` finds them (0011)."""
    owner = (
        WebhookMessage.client_id.is_(None)
        if client_id is None
        else WebhookMessage.client_id == client_id
    )
    return owner, WebhookMessage.url == url


def _disable_endpoint(
    session: Session, endpoint: WebhookEndpoint, prepared: Prepared, now: datetime
) -> int:
    """A 410 Gone: stop sending to this URL for this client, now and for pending messages
    (the endpoint is locked, then the messages); how many messages it disabled."""
    endpoint.disabled_at = now
    endpoint.disabled_reason = "the endpoint answered 410 Gone"
    session.flush()
    result = session.execute(
        update(WebhookMessage)
        .where(
            *_messages_of(prepared.client_id, prepared.url),
            WebhookMessage.status == outbox.PENDING,
        )
        .values(status=outbox.DISABLED, next_attempt_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
