"""Job lifecycle: create, read, claim (with a fencing lease), complete, fail, cancel."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from segsvc import notify
from segsvc.blobs import BlobMissingError, BlobStore
from segsvc.errors import ConflictError, GoneError, NotFoundError, ValidationError
from segsvc.images import ValidatedImage
from segsvc.ml.imaging import render_overlay_png
from segsvc.models import ENDED_JOB_CLEARS, Job, JobStatus, db_clock, db_now, db_time
from segsvc.services.reconcile import SUSPECT_AFTER_ATTEMPTS, lost_runs
from segsvc.webhooks.outbox import JOB_COMPLETED, JOB_STARTED, record_job_events

# A job given back this many times (each a failed forward pass or result write), the first at
# least RELEASE_GIVE_UP_S ago and none more than RELEASE_GIVE_UP_S after the one before, ends
# failed.
MAX_RELEASES = 5
RELEASE_GIVE_UP_S = 300.0
# And given back this many times in all, however far apart: a requeued message goes to the
# back of the queue, so behind a backlog that takes over RELEASE_GIVE_UP_S to drain every
# release restarted the window, and a job whose batch always failed cycled for ever.
MAX_RELEASES_IN_ALL = 20


def create_job(
    *,
    session: Session,
    image: ValidatedImage,
    client_id: uuid.UUID | None = None,
    request_id: str | None = None,
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
    idempotency_key: str | None = None,
    request_fingerprint: str | None = None,
    store: BlobStore | None = None,
) -> Job:
    """Store a new queued job with its input (the caller commits, then enqueues).

    `store` decides where the upload's bytes live (the row, or a file the row points at).
    """
    return create_jobs(
        session=session,
        images=[image],
        client_id=client_id,
        request_id=request_id,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        idempotency_keys=[idempotency_key],
        request_fingerprint=request_fingerprint,
        store=store,
    )[0]


def create_jobs(
    *,
    session: Session,
    images: Sequence[ValidatedImage],
    client_id: uuid.UUID | None = None,
    request_id: str | None = None,
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
    idempotency_keys: Sequence[str | None] | None = None,
    request_fingerprint: str | None = None,
    store: BlobStore | None = None,
    job_ids: Sequence[uuid.UUID] | None = None,
) -> list[Job]:
    """Store one queued job per image, in order, in one flush (a multi-row INSERT); `job_ids`
    names them (new random ids by default)."""
    keys = list(idempotency_keys or [None] * len(images))
    ids = list(job_ids or [uuid.uuid4() for _ in images])
    # The database's clock, like every other stamp a job gets (started_at, leases,
    # completed_at): queue times, the reconciler's cutoffs and a canary's window compare them.
    now = db_clock(session)
    jobs = [
        Job(
            id=job_id,
            client_id=client_id,
            status=JobStatus.QUEUED,
            created_at=now,
            request_id=request_id,
            input_sha256=image.sha256,
            input_content_type=image.content_type,
            input_width=image.width,
            input_height=image.height,
            input_bytes=store.put(image.data) if store is not None else image.data,
            model_input=image.model_input,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            idempotency_key=key,
            request_fingerprint=request_fingerprint,
        )
        for image, key, job_id in zip(images, keys, ids, strict=True)
    ]
    session.add_all(jobs)
    session.flush()
    return jobs


def parse_job_id(raw: str) -> uuid.UUID:
    """A job id from a URL; anything malformed is simply not found."""
    try:
        return _uuid(raw)
    except (ValueError, TypeError, AttributeError):
        raise NotFoundError(f"No job {raw[:64]!r}.") from None


def _uuid(raw: str) -> uuid.UUID:
    """A UUID written in ASCII: `uuid.UUID` parses through `int()`, which also takes other
    scripts' digits (Arabic-Indic, fullwidth), so one job would have many ids, and the raw
    text of such an id is not a valid header value."""
    if not raw.isascii():
        raise ValueError("not ASCII")
    return uuid.UUID(raw)


def get_job(
    *, session: Session, job_id: uuid.UUID | str, client_id: uuid.UUID | None = None
) -> Job:
    """A job visible to `client_id` (None: any); another client's job is not found."""
    jid = job_id if isinstance(job_id, uuid.UUID) else parse_job_id(job_id)
    job = session.get(Job, jid)
    if job is None or (client_id is not None and job.client_id != client_id):
        raise NotFoundError(f"No job {jid}.")
    return job


MAX_WAIT_SECONDS = 30.0


def parse_wait(raw: str | None) -> float:
    """The `?wait=` of a long poll: 0 to MAX_WAIT_SECONDS seconds (422 otherwise)."""
    if raw is None or raw == "":
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds <= MAX_WAIT_SECONDS:
        raise ValidationError(f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}.")
    return seconds


def wait_for_job(
    *,
    session: Session,
    job_id: str,
    client_id: uuid.UUID | None,
    seconds: float,
    redis_url: str | None,
    max_waiters: int = 8,
) -> Job:
    """The job once it is terminal, or as it is after `seconds` (a long poll).

    The session's connection is given back while waiting, so a waiting client holds no
    database connection; the job is re-read after every notice that does not carry its end
    state and at least once a second. At most `max_waiters` polls wait per process; others
    are answered at once.
    """
    jid = parse_job_id(job_id)
    with watch_jobs([jid], seconds=seconds, redis_url=redis_url, max_waiters=max_waiters) as w:
        # Read after the watch began, so a notice sent after this read is never missed.
        job = get_job(session=session, job_id=jid, client_id=client_id)
        return w.until_ended(
            session=session,
            jobs=[job],
            read=lambda: [get_job(session=session, job_id=jid, client_id=client_id)],
        )[0]


MAX_JOBS_PER_READ = 100


def parse_job_ids(raw: str | None) -> list[uuid.UUID]:
    """`?ids=a,b,...` of a batch read: 1 to MAX_JOBS_PER_READ ids, repeats dropped (else 422)."""
    # Repeats dropped before the limit is counted: the same id 101 times is one job.
    values = list(dict.fromkeys(v.strip() for v in (raw or "").split(",") if v.strip()))
    if not values:
        raise ValidationError("Name the jobs to read: ?ids=<id>,<id>,...")
    if len(values) > MAX_JOBS_PER_READ:
        raise ValidationError(f"At most {MAX_JOBS_PER_READ} ids per request.")
    try:
        return list(dict.fromkeys(_uuid(v) for v in values))
    except ValueError:
        raise ValidationError("Every id must be a job id (a UUID).") from None


def get_jobs(
    *, session: Session, job_ids: Sequence[uuid.UUID], client_id: uuid.UUID | None
) -> list[Job]:
    """The jobs among `job_ids` visible to `client_id` (None: any), in the order asked."""
    query = select(Job).where(Job.id.in_(job_ids))
    if client_id is not None:
        query = query.where(Job.client_id == client_id)
    found = {job.id: job for job in session.scalars(query)}
    return [found[jid] for jid in job_ids if jid in found]


def wait_for_jobs(
    *,
    session: Session,
    job_ids: Sequence[uuid.UUID],
    client_id: uuid.UUID | None,
    seconds: float,
    redis_url: str | None,
    max_waiters: int = 8,
) -> list[Job]:
    """The visible jobs among `job_ids` once all of them are terminal, or as they are after
    `seconds`: one long poll for many jobs, with `wait_for_job`'s guarantees."""

    def read() -> list[Job]:
        return get_jobs(session=session, job_ids=job_ids, client_id=client_id)

    with watch_jobs(job_ids, seconds=seconds, redis_url=redis_url, max_waiters=max_waiters) as w:
        return w.until_ended(session=session, jobs=read(), read=read)


@dataclass
class JobWatch:
    """Notices for some jobs until a deadline (`watch_jobs`)."""

    deadline: float  # time.monotonic()
    subscription: notify.Subscription | None  # None: answer at once (no wait, or no slot)
    recheck_s: float = 0.0

    def until_ended(
        self, *, session: Session, jobs: list[Job], read: Callable[[], list[Job]]
    ) -> list[Job]:
        """`jobs` (read after the watch began) once all are terminal, or as they are at the
        deadline. No database connection is held while waiting. Notices that carry end states
        end those jobs without a read (a job without a notice has not ended, as far as the
        notices know); a notice without its state re-reads them all, and so does a second
        without a read (a path that sends no notice, a lost one)."""
        read_at = time.monotonic()
        while True:
            now = time.monotonic()
            left = self.deadline - now
            done = all(job.job_status.is_terminal for job in jobs)
            if self.subscription is None or done or left <= 0 or notify.stopping():
                return jobs
            session.close()  # no connection held while waiting; the next read sees new commits
            due = max(0.0, read_at + self.recheck_s - now)
            states = self.subscription.wait(min(left, due))
            ended = [_with_end_state(job, (states or {}).get(str(job.id))) for job in jobs]
            usable = [job for job in ended if job is not None]
            recheck_due = time.monotonic() - read_at >= self.recheck_s
            if states is not None and len(usable) == len(jobs) and not recheck_due:
                jobs = usable
            else:  # the re-check is due, or a notice came without a state this release can use
                jobs, read_at = read(), time.monotonic()


@contextmanager
def watch_jobs(
    job_ids: Iterable[uuid.UUID], *, seconds: float, redis_url: str | None, max_waiters: int
) -> Iterator[JobWatch]:
    """Watch these jobs' end notices for up to `seconds` (0: not at all), from now on: begin
    before the read (or the commit) that the wait starts from, so no notice falls between."""
    if seconds <= 0 or notify.stopping():  # no wait asked, or the process is shutting down
        yield JobWatch(0.0, None)
        return
    deadline = time.monotonic() + seconds
    with (
        notify.waiter_slot(max_waiters) as waiting,
        notify.subscribe(redis_url if waiting else None, *job_ids) as (subscription, recheck_s),
    ):
        yield JobWatch(deadline, subscription if waiting else None, recheck_s)


# What ending a job writes to the columns of its public view: a job's end notice carries these
# (`end_states`), so a long poll woken by it answers without reading the job again.
END_STATE_COLUMNS = (
    "status",
    "started_at",
    "completed_at",
    "attempts",
    "error_code",
    "error_message",
    "model_version",
    "class_fractions",
    "queue_ms",
    "predict_ms",
    "batch_size",
)
_END_STATE_TIMES = ("started_at", "completed_at")


def end_state(values: Mapping[str, Any]) -> dict[str, Any]:
    """A notice's end state from an ended job's committed values (JSON-able: ISO times)."""
    state = {key: values[key] for key in END_STATE_COLUMNS}
    for key in _END_STATE_TIMES:
        state[key] = state[key].isoformat() if state[key] is not None else None
    return state


def _with_end_state(job: Job, state: notify.State | None) -> Job | None:
    """`job` (detached) as a notice's end state says it ended; itself when no state came for it
    or it had ended already; None for a state this release cannot use (read the job)."""
    if state is None or job.job_status.is_terminal:
        return job
    if set(state) != set(END_STATE_COLUMNS):
        return None
    try:
        if not JobStatus(state["status"]).is_terminal:
            return None
        times = {
            key: datetime.fromisoformat(state[key]) if state[key] is not None else None
            for key in _END_STATE_TIMES
        }
    except (TypeError, ValueError):
        return None
    for key in END_STATE_COLUMNS:  # on the detached copy only: nothing is flushed from it
        setattr(job, key, times.get(key, state[key]))
    return job


def get_finished_job(*, session: Session, job_id: str, client_id: uuid.UUID | None) -> Job:
    """A succeeded job (its deferred mask loads on access); 409 while it is not finished."""
    job = get_job(session=session, job_id=job_id, client_id=client_id)
    if job.status != JobStatus.SUCCEEDED:
        raise ConflictError(f"Job {job.id} is {job.status}; the mask exists once it succeeds.")
    return job


def read_mask_png(
    *, session: Session, job_id: str, client_id: uuid.UUID | None, store: BlobStore
) -> bytes:
    """The stored class-mask PNG of a succeeded job (wherever the blob store keeps it)."""
    job = get_finished_job(session=session, job_id=job_id, client_id=client_id)
    return _read_blob(store, job.mask_png, f"The mask of job {job.id} is no longer stored.")


def read_overlay_png(
    *, session: Session, job_id: str, client_id: uuid.UUID | None, store: BlobStore
) -> bytes:
    """The input with its mask blended on it; 410 once retention deleted the input."""
    job = get_finished_job(session=session, job_id=job_id, client_id=client_id)
    mask_png = _read_blob(store, job.mask_png, f"The mask of job {job.id} is no longer stored.")
    image = _read_blob(
        store, job.input_bytes, f"The input image of job {job.id} is no longer stored."
    )
    return render_overlay_png(image, mask_png)


def _read_blob(store: BlobStore, value: bytes | None, gone_message: str) -> bytes:
    """A row's blob, or 410 Gone when retention deleted it or its file is missing (a store
    that cannot be read raises `BlobStoreUnavailableError`: a 503, retried)."""
    try:
        data = store.get(value)
    except BlobMissingError:
        data = None
    if not data:
        raise GoneError(gone_message)
    return data


@dataclass
class Claimed:
    """A job a worker now holds, with what it needs to run it."""

    id: uuid.UUID
    lease_token: uuid.UUID
    created_at: datetime
    started_at: datetime
    width: int
    height: int
    attempts: int
    model_input: bytes | None
    request_id: str | None = None
    # Lost twice or more before this claim (`reconcile.is_suspect`): it runs with no other job.
    suspect: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def claim_jobs(
    *,
    session: Session,
    job_ids: Sequence[uuid.UUID],
    lease_seconds: int,
    max_attempts: int | None = None,
    suspects: bool = True,
) -> list[Claimed]:
    """Atomically take jobs that are queued (or whose lease expired) for this worker.

    The conditional UPDATE is the fence: a duplicate delivery, or a second worker holding the
    same id, updates nothing and so runs nothing.

    A running job whose lease expired is taken over only on its first attempt. One lost more
    often is the reconciler's to judge (end it at the attempt limit, or run it as a quarantined
    suspect), so a stray delivery must not run it past those rules: say a dead worker's unacked
    message that Redis restores after its visibility timeout. Nor is one taken over once it has
    lost `max_attempts` runs (`SEG_JOB_MAX_ATTEMPTS`: at 1, its first lost run ends it failed).

    A suspect (a job lost twice or more, which may be what crashes the worker) is taken only
    by a claim that names it alone: among other jobs it would fail them with it if it is poison,
    and be judged poison if one of them is (the reconciler marks its message so that a worker
    claims it alone; a stray copy among others is left to that message). `suspects=False`: not
    even alone. The micro-batcher says so for a message the reconciler did not mark: it would
    claim the suspect at once, while its earlier batches are still being stored, where a marked
    message has them stored first; such a stray copy, too, is left to the marked message.

    The lease is granted and judged on the database's clock, so hosts whose clocks disagree
    (by more than a lease, even) neither take over live jobs nor leave dead ones.
    """
    ids = list(dict.fromkeys(job_ids))
    if not ids:
        return []
    now = db_now(session)
    token = uuid.uuid4()
    claimable = or_(
        Job.status == JobStatus.QUEUED,
        and_(
            Job.status == JobStatus.RUNNING,
            Job.lease_expires_at < now,
            lost_runs() < min(SUSPECT_AFTER_ATTEMPTS, max_attempts or SUSPECT_AFTER_ATTEMPTS),
        ),
    )
    if len(ids) > 1 or not suspects:
        claimable = and_(claimable, lost_runs() < SUSPECT_AFTER_ATTEMPTS)
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(ids), claimable, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.RUNNING,
            started_at=now,
            attempts=Job.attempts + 1,
            lease_token=token,
            lease_expires_at=db_now(session, plus_seconds=lease_seconds),
        )
        # One statement returns all the worker needs, inputs included: the batch's inputs are
        # 48 KiB each, and a second SELECT for them cost a round trip on the model's path.
        .returning(
            Job.id,
            Job.created_at,
            Job.input_width,
            Job.input_height,
            Job.attempts,
            Job.request_id,
            Job.webhook_url,
            Job.model_input,
            Job.started_at,
            Job.releases,
        )
        .execution_options(synchronize_session=False)
    ).all()
    # job.started once per job (a retry after a lost worker is not a new start), and only
    # jobs with a webhook can have a message: the others need no outbox query at all.
    record_job_events(
        session=session,
        job_ids=[r[0] for r in rows if r[4] == 1 and r[6] is not None],
        event=JOB_STARTED,
    )
    return [
        Claimed(
            id=r[0],
            lease_token=token,
            created_at=r[1],
            started_at=r[8],
            width=r[2],
            height=r[3],
            attempts=r[4],
            model_input=r[7],
            request_id=r[5],
            # Its lost runs before this claim, which counted one attempt more.
            suspect=r[4] - 1 - r[9] >= SUSPECT_AFTER_ATTEMPTS,
        )
        for r in rows
    ]


def complete_jobs(*, session: Session, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write results of claimed jobs in bulk; each row is fenced by its lease token.

    Each result has: id, lease_token, mask_png, class_fractions, model_version, queue_ms,
    predict_ms, batch_size. A job whose client asked to cancel it ends canceled, without its
    result. Returns the end state of each job this ended, by id (`end_state`: what the jobs'
    notices carry once this commits); a result fenced out is not in it.
    """
    if not results:
        return {}
    now = db_now(session)  # the same clock as the claim's `started_at`
    ended: dict[uuid.UUID, Any] = {}  # id -> the row the ending returned
    subscribed: list[uuid.UUID] = []  # finished jobs with a webhook
    by_token: dict[uuid.UUID, list[uuid.UUID]] = {}
    for r in results:
        by_token.setdefault(r["lease_token"], []).append(r["id"])
    for token, ids in by_token.items():  # a claimed batch shares one token: one statement
        rows = session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.lease_token == token, Job.status == JobStatus.RUNNING)
            .values(
                # A cancel that arrived while the batch ran takes effect at this boundary.
                status=case((Job.cancel_requested, JobStatus.CANCELED), else_=JobStatus.SUCCEEDED),
                error_code=case((Job.cancel_requested, "canceled"), else_=None),
                error_message=case((Job.cancel_requested, "Canceled by the client."), else_=None),
                completed_at=now,
                lease_expires_at=None,
                **ENDED_JOB_CLEARS,
            )
            .returning(Job.id, Job.webhook_url, *_ENDING_RETURNS)
            .execution_options(synchronize_session=False)
        ).all()
        ended.update((row.id, row) for row in rows)
        subscribed += [row.id for row in rows if row.webhook_url is not None]
    # Only a job that ended succeeded gets its result: one canceled at this boundary keeps none
    # (its mask would otherwise be stored, and its end state carry a result it does not have).
    payload = [
        {key: r[key] for key in _RESULT_COLUMNS}
        for r in results
        if r["id"] in ended and ended[r["id"]].status == JobStatus.SUCCEEDED
    ]
    if payload:  # ORM bulk UPDATE by primary key: one executemany for every row's result
        session.execute(update(Job), payload)
    record_job_events(session=session, job_ids=subscribed, event=JOB_COMPLETED)
    stored = {p["id"]: p for p in payload}
    return {
        str(job_id): end_state({**_NO_RESULT, **row._asdict(), **stored.get(job_id, {})})
        for job_id, row in ended.items()
    }


_RESULT_COLUMNS = (
    "id",
    "mask_png",
    "class_fractions",
    "model_version",
    "queue_ms",
    "predict_ms",
    "batch_size",
)
# A job that ended without a result (canceled at the batch boundary): its end state's result.
_NO_RESULT: dict[str, None] = {key: None for key in _RESULT_COLUMNS if key != "id"}
# The rest of a job's end state, as the statement that ends it left it.
_ENDING_RETURNS = tuple(
    getattr(Job, key) for key in END_STATE_COLUMNS if key not in _RESULT_COLUMNS
)


def fail_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    code: str,
    message: str,
    lease_token: uuid.UUID | None = None,
    model_version: str | None = None,
) -> JobStatus | None:
    """End a job as failed (fenced by the lease when one is given); `model_version`: the
    version that ran it, when one did (a canary's verdict counts the failure against it).
    A job whose client asked to cancel it ends canceled instead, as a result would: the cancel
    takes effect at the batch boundary, whatever the batch's outcome. Returns the status it
    ended with (failed or canceled), None when it ended nothing."""
    conds = [Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])]
    if lease_token is not None:
        conds.append(Job.lease_token == lease_token)
    canceled = Job.cancel_requested
    res = session.execute(
        update(Job)
        .where(*conds)
        .values(
            status=case((canceled, JobStatus.CANCELED), else_=JobStatus.FAILED),
            completed_at=db_now(session),
            error_code=case((canceled, "canceled"), else_=code),
            error_message=case((canceled, "Canceled by the client."), else_=message[:2000]),
            model_version=case((canceled, None), else_=model_version),
            lease_expires_at=None,
            **ENDED_JOB_CLEARS,
        )
        .returning(Job.status)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if res is None:
        return None
    record_job_events(session=session, job_ids=[job_id], event=JOB_COMPLETED)
    return JobStatus(res)


def release_job(*, session: Session, job_id: uuid.UUID, lease_token: uuid.UUID) -> bool:
    """Give a claimed job back to the queue (a transient failure; it will run again); True if
    it was (`give_back_job`)."""
    status = give_back_job(session=session, job_id=job_id, lease_token=lease_token)
    return status == JobStatus.QUEUED


def give_back_job(
    *, session: Session, job_id: uuid.UUID, lease_token: uuid.UUID
) -> JobStatus | None:
    """Give a claimed job back to the queue (a transient failure; it will run again): queued
    when it was, the status it ended with when it ended instead (failed or canceled, below),
    None when this lease no longer holds it.

    A job given back `MAX_RELEASES` times over at least `RELEASE_GIVE_UP_S`, or
    `MAX_RELEASES_IN_ALL` times in all, ends failed with `worker_error` instead: a failure
    that keeps coming back for that long is not transient, and the job must not cycle for
    ever. A short outage (a blob store away for a few seconds) releases jobs several times in
    a row but fails none. A release more than `RELEASE_GIVE_UP_S` after the previous one
    starts the window again (an old release and a short outage later are not a failure that
    kept coming). Timed on the database's clock, like the lease. A job whose client asked to
    cancel it is not given back: it ends canceled
    (`fail_job`), as its result would have ended it."""
    now = db_now(session)
    fence = (
        Job.id == job_id,
        Job.lease_token == lease_token,
        Job.status == JobStatus.RUNNING,
        Job.cancel_requested.is_(False),
    )
    cutoff = db_now(session, plus_seconds=-RELEASE_GIVE_UP_S)
    # Rows released before 0011 have no window count: all of their releases are in it.
    in_window = func.coalesce(Job.window_releases, Job.releases)
    # With one release in the window, it is the window's start (older rows have no last).
    previous = case((in_window <= 1, Job.first_released_at), else_=Job.last_released_at)
    restarts = previous <= cutoff
    keeps_trying = and_(
        Job.releases < MAX_RELEASES_IN_ALL - 1,
        or_(
            restarts,
            in_window < MAX_RELEASES - 1,
            Job.first_released_at.is_(None),
            Job.first_released_at > cutoff,
        ),
    )
    res = session.execute(
        update(Job)
        .where(*fence, keeps_trying)
        .values(
            status=JobStatus.QUEUED,
            lease_token=None,
            lease_expires_at=None,
            releases=Job.releases + 1,  # all of them: `attempts - releases` are lost runs
            window_releases=case((restarts, 1), else_=in_window + 1),
            first_released_at=case(
                (restarts, now), else_=func.coalesce(Job.first_released_at, now)
            ),
            last_released_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount:  # type: ignore[attr-defined]
        return JobStatus.QUEUED
    return fail_job(
        session=session,
        job_id=job_id,
        code="worker_error",
        message=f"The worker failed to run this job {MAX_RELEASES} times over "
        f"{RELEASE_GIVE_UP_S / 60:.0f} minutes or more, or {MAX_RELEASES_IN_ALL} times in all "
        "(its batch's forward pass or result write failed each time); the worker's log says "
        "why.",
        lease_token=lease_token,
    )


def cancel_job(*, session: Session, job_id: str, client_id: uuid.UUID | None) -> Job:
    """Cancel a queued job at once; a running one stops at its next batch boundary."""
    job = get_job(session=session, job_id=job_id, client_id=client_id)
    # Re-read the row under a lock: a worker's claim or result may have committed since the
    # read above, and a plain UPDATE would then overwrite `running` or `succeeded` with
    # `canceled` (and send a second job.completed webhook). The row may be gone by then (row
    # retention deleted it meanwhile): not found, as it now is.
    locked = session.scalar(
        select(Job)
        .where(Job.id == job.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if locked is None:
        raise NotFoundError(f"No job {job.id}.")
    job = locked
    if job.job_status.is_terminal:
        raise ConflictError(f"Job {job.id} is already {job.status}.")
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.CANCELED
        job.completed_at = db_time(session)  # as a worker's result's: the database's clock
        job.error_code = "canceled"
        job.error_message = "Canceled by the client."
        for column, value in ENDED_JOB_CLEARS.items():
            setattr(job, column, value)
        session.flush()
        record_job_events(session=session, job_ids=[job.id], event=JOB_COMPLETED)
    session.flush()
    return job


def queue_depth(*, session: Session) -> int:
    """Jobs waiting to run."""
    return int(
        session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0
    )
