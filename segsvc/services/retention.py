"""Row retention: ended jobs past `SEG_JOB_RETENTION_DAYS` are deleted, with their webhook log
and ratings (the database cascades), except jobs with a corrected mask (training labels).

Input retention (the uploads of unlabeled jobs, after `SEG_RETENTION_DAYS`) is
`services.feedback.purge_unlabeled_chunk`; this one bounds the table itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVarTuple

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from segsvc.blobs import POINTER_LENGTH, is_pointer, pointer_digest
from segsvc.models import Feedback, Job, JobStatus, WebhookMessage
from segsvc.webhooks.outbox import PENDING

DELETE_CHUNK = 1000
_Ts = TypeVarTuple("_Ts")
ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass(frozen=True)
class Cleared:
    """What a retention pass, or one chunk of it, cleared: the input purge
    (`services.feedback.purge_unlabeled_chunk`) or this module's row deletion."""

    jobs: int  # rows whose input was deleted, or rows deleted
    files: list[str]  # sha256 of the fs blob files those rows named
    # Where the next chunk starts, (created_at, id) of the last row this one looked at; None
    # when the pass is done.
    resume: tuple[datetime, uuid.UUID] | None = None


def has_mask_label() -> ColumnElement[bool]:
    """The job has a corrected mask (a training label): retention keeps its input and row."""
    return exists().where(Feedback.job_id == Job.id, Feedback.mask_png.is_not(None))


def lock_chunk(
    query: Select[*_Ts], *, after: tuple[datetime, uuid.UUID] | None, size: int
) -> Select[*_Ts]:
    """`query` (selecting Job.id, Job.created_at first) for the next `size` jobs in
    (created_at, id) order after `after`, locked; rows another transaction holds are skipped,
    to the next pass."""
    if after is not None:
        # `created_at >= ` lets an index on created_at start there; the pair breaks ties.
        query = query.where(Job.created_at >= after[0], tuple_(Job.created_at, Job.id) > after)
    return query.order_by(Job.created_at, Job.id).limit(size).with_for_update(skip_locked=True)


def resume_after(
    locked: Sequence[Row[*tuple[Any, ...]]], size: int
) -> tuple[datetime, uuid.UUID] | None:
    """Where the chunk after `locked` (rows of `lock_chunk`) starts; None: it was the last."""
    return (locked[-1][1], locked[-1][0]) if len(locked) == size else None


def delete_ended_jobs_chunk(
    *,
    session: Session,
    status: JobStatus,
    cutoff: datetime,
    after: tuple[datetime, uuid.UUID] | None = None,
    retried_since: datetime | None = None,
) -> Cleared:
    """Delete up to DELETE_CHUNK jobs of one ended `status` created and ended before `cutoff`
    that have no mask label, walking them in (created_at, id) order from `after` on the index
    on (status, created_at). The caller commits each chunk (`retrain.tasks.delete_expired_jobs`).

    Ended before it too: a job that waited in the queue for days (a worker outage, a backlog)
    was deleted as it ended, its result with it, and its `job.completed` webhook, which is
    retried for days after the event, not after the submit. With `retried_since`, a job with
    a pending webhook message whose retries began then or later (its event, or a client's
    redeliver) is kept too, until they end.

    Rows are locked first (another transaction's rows are skipped, to the next pass) and
    deleted by a second statement that checks the label again: a mask committed while the
    first waited is seen by the second, as in the input purge."""
    kept = has_mask_label()
    if retried_since is not None:
        kept = kept | exists().where(
            WebhookMessage.job_id == Job.id,
            WebhookMessage.status == PENDING,
            func.coalesce(WebhookMessage.redelivered_at, WebhookMessage.created_at)
            >= retried_since,
        )
    input_is_pointer = func.length(Job.input_bytes) == POINTER_LENGTH
    mask_pointer = case((func.length(Job.mask_png) == POINTER_LENGTH, Job.mask_png), else_=None)
    query = select(
        Job.id, Job.created_at, case((input_is_pointer, Job.input_sha256), else_=None), mask_pointer
    ).where(
        Job.status == status,
        Job.created_at < cutoff,
        or_(Job.completed_at.is_(None), Job.completed_at < cutoff),
        ~kept,
    )
    locked = session.execute(lock_chunk(query, after=after, size=DELETE_CHUNK)).all()
    named = {job_id: (input_digest, mask) for job_id, _, input_digest, mask in locked}
    deleted = session.scalars(
        delete(Job)
        .where(Job.id.in_(list(named)), ~kept)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    files: set[str] = set()
    for job_id in deleted:
        input_digest, mask = named[job_id]
        if input_digest:
            files.add(input_digest)
        if is_pointer(mask):  # an inline PNG may have a pointer's length too
            files.add(pointer_digest(mask))
    return Cleared(len(deleted), sorted(files), resume_after(locked, DELETE_CHUNK))
