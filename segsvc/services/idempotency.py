"""`Idempotency-Key` on submissions: the same key and body within 24 h give back the same job."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from segsvc.db import savepoint
from segsvc.errors import ConflictError, ValidationError
from segsvc.models import Job, db_time

KEY_WINDOW = timedelta(hours=24)
MAX_KEY_LENGTH = 255
_REUSED = "This Idempotency-Key was already used with a different request body."


@dataclass(frozen=True)
class IdempotentRequest:
    """A submission's key and the fingerprint of its body."""

    key: str
    fingerprint: str


def parse_request(
    raw_key: str | None, *, image_sha256: str | list[str], fields: Iterable[tuple[str, str]]
) -> IdempotentRequest | None:
    """The request's key and body fingerprint, None without a key; a malformed key is 422.

    A batch passes every image's sha256, in order: the same images in another order, or one
    more or less, are another body."""
    if raw_key is None:
        return None
    key = raw_key.strip()
    if "," in key:
        # A repeated header reaches the app folded into one value joined by commas (gunicorn
        # "k1,k2", werkzeug "k1, k2"; RFC 9110 5.3 lets any hop do so): taken as one key it
        # made a new job where the client expected a replay. Nothing tells a fold from a key
        # with a comma in it, so a key may not contain one.
        raise ValidationError(
            "Idempotency-Key was sent more than once, or contains a comma: send the header "
            f"once, with a key of 1 to {MAX_KEY_LENGTH} printable ASCII characters other than "
            "a comma."
        )
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise ValidationError(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters, "
            "without a comma."
        )
    body = json.dumps({"image": image_sha256, "fields": sorted(fields)}, separators=(",", ":"))
    return IdempotentRequest(key=key, fingerprint=hashlib.sha256(body.encode()).hexdigest())


def find_replay(*, session: Session, client_id: object, req: IdempotentRequest) -> Job | None:
    """The job an earlier request with this key created (within 24 h), or None.

    The same key with another body is a client bug: 422. A key older than the window is
    released, so it can name a new job.
    """
    jobs = _find_jobs(session=session, client_id=client_id, req=req, keys=[req.key])
    return jobs[0] if jobs else None


def batch_keys(req: IdempotentRequest, count: int) -> list[str]:
    """The stored keys of a batch's jobs, one per image. They start with a control character,
    which a client's own key cannot contain, so they never collide with a single submit's."""
    return [_batch_key(req.key, index) for index in range(count)]


def _batch_key(key: str, index: int) -> str:
    return f"\x1fbatch:{hashlib.sha256(key.encode()).hexdigest()}:{index}"


def key_has_jobs(*, session: Session, client_id: object, raw_key: str | None, batch: bool) -> bool:
    """Whether a request under this key already stored its job(s) within the window: a retry
    whose answer will be the replay (or a 422, for another body). Cheap, before the body is
    read: a retry must not be refused for the rate its first try already paid."""
    key = (raw_key or "").strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        return False
    stored = _batch_key(key, 0) if batch else key
    return bool(
        session.scalar(
            select(Job.id)
            .where(
                Job.client_id == client_id,
                Job.idempotency_key == stored,
                Job.created_at >= db_time(session) - KEY_WINDOW,
            )
            .limit(1)
        )
    )


def find_batch_replay(
    *, session: Session, client_id: object, req: IdempotentRequest, count: int
) -> list[Job] | None:
    """The jobs an earlier batch with this key created (within 24 h), in upload order, or None.

    A batch's jobs are inserted in one transaction, so they are found all together or not at
    all; a different body under the same key is 422, as for a single submit. Keys are scoped
    per endpoint: a single submit's key never replays a batch, nor the other way round."""
    return _find_jobs(
        session=session,
        client_id=client_id,
        req=req,
        keys=batch_keys(req, count),
        after=lambda index: _batch_key(req.key, index),
    )


def _find_jobs(
    *,
    session: Session,
    client_id: object,
    req: IdempotentRequest,
    keys: list[str],
    after: Callable[[int], str] | None = None,
) -> list[Job] | None:
    """The jobs stored under `keys`, in their order: None when there are none or their window
    has passed (the keys are released), 422 when they do not match this request's body.

    Each job's window is judged on its own: the keys of jobs past it are released, and only
    the others answer. `after(i)` names a batch's key `i`: an expired batch larger than this
    request has its keys beyond `keys` released too (its keys run 0..n-1 without a gap), or
    they would mix with those of the batch this request stores."""
    jobs = list(
        session.scalars(
            select(Job).where(Job.client_id == client_id, Job.idempotency_key.in_(keys))
        )
    )
    if not jobs:
        return None
    cutoff = db_time(session) - KEY_WINDOW  # created_at is on that clock
    stale = [job for job in jobs if job.created_at < cutoff]
    if stale:
        jobs = [job for job in jobs if job.created_at >= cutoff]  # before `stale` is expired
        _release(session, [job.id for job in stale])
        for job in stale:
            session.expire(job)
        if after is not None:
            index = len(keys)
            while _release_stale_key(session, client_id, after(index), cutoff):
                index += 1
        if not jobs:
            return None
    if len(jobs) != len(keys) or any(job.request_fingerprint != req.fingerprint for job in jobs):
        raise ValidationError(_REUSED)
    order = {key: index for index, key in enumerate(keys)}
    return sorted(jobs, key=lambda job: order[job.idempotency_key or ""])


def _release(session: Session, job_ids: list[uuid.UUID]) -> None:
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids))
        .values(idempotency_key=None)
        .execution_options(synchronize_session=False)
    )


def _release_stale_key(session: Session, client_id: object, key: str, cutoff: datetime) -> bool:
    """Release `key` if a job past the window holds it; whether one did."""
    released = session.scalars(
        update(Job)
        .where(Job.client_id == client_id, Job.idempotency_key == key, Job.created_at < cutoff)
        .values(idempotency_key=None)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    return bool(released)


class KeyInUseError(ConflictError):
    """A twin request holds the key: a retry (after Retry-After) replays its job."""

    code = "idempotency_key_in_use"


@contextmanager
def race_guard(*, session: Session, req: IdempotentRequest | None) -> Iterator[None]:
    """Around the insert of a keyed job: a concurrent twin that won the unique index turns the
    loser's insert into a 409, and its retry then gets the winner's job."""
    if req is None:
        yield
        return
    # On SQLite too two requests can both miss the replay and insert; its loser's request ends
    # here anyway.
    try:
        with savepoint(session):
            yield
    except IntegrityError as exc:
        raise KeyInUseError(
            "A request with this Idempotency-Key is being processed; retry to get its job.",
            retry_after=1,
        ) from exc
