"""/v1/jobs: submit, read, results, cancel."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import ExitStack, contextmanager

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import FileStorage

from api.app import MULTIPART_OVERHEAD
from api.auth import authenticate_request, current_client
from api.context import celery, db, settings
from api.schemas import accepted_body, job_body
from api.turns import FairTurn, KeyTurns, PixelBudget, turn
from segsvc import notify
from segsvc.blobs import blob_store
from segsvc.errors import (
    BadRequestError,
    RateLimitedError,
    SegError,
    UnavailableError,
    ValidationError,
)
from segsvc.images import LARGE_DECODE_PIXELS, ValidatedImage, validate_image
from segsvc.models import Job, JobStatus
from segsvc.queue import enqueue_jobs
from segsvc.services import idempotency, limits
from segsvc.services import jobs as job_service
from segsvc.services import webhooks as webhook_service

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1")
bp.before_request(authenticate_request)


@bp.post("/jobs")
def submit_job() -> tuple[Response, int, dict[str, str]]:
    """Validate an upload, store the job, commit, then enqueue its id; `?wait=S` then holds
    the answer up to S seconds and returns the finished job (201) if it ends by then: as JSON,
    or, for a client that asks for `Accept: image/png`, its mask PNG itself (one round trip
    from photo to mask, as a synchronous predict endpoint answers)."""
    wait = job_service.parse_wait(query_arg("wait"))  # a bad value stores nothing
    refused = _charge(cost=1, batch=False)
    upload = request.files.get("image")
    check_files_are_files("image")
    if upload is None:
        raise BadRequestError("Send the image as multipart/form-data in the field 'image'.")
    _check_part_names()
    check_fields_are_text("webhook", "webhook_events")
    check_single("image", "webhook")
    data = _read(upload)
    # A keyed retry is looked up before the decode: a replay needs only the bytes' sha256 (and
    # the webhook was checked when the job was made: a retry must not fail on it now).
    idem, replay = _find_replay([data], batch=False)
    if replay:
        return _replayed(replay, batch=False, wait=wait)
    if refused is not None:
        raise refused
    image = _validate(data)
    hook, job_id = _webhook(), uuid.uuid4()
    # Watched from before its commit: no end notice can come before the watch, so the wait
    # needs no first read of a job it has just written.
    with _watch([job_id], wait) as watch:
        (job,) = _store_and_enqueue([image], idem, [idem.key] if idem else None, hook, [job_id])
        body = accepted_body(job)
        done = _until_ended(watch, job, read_first=False)
    location = {"Location": body["urls"]["self"]}
    if done.job_status.is_terminal:
        return _ended_answer(done, location)
    return jsonify(body), 202, location


def _until_ended(watch: job_service.JobWatch, job: Job, *, read_first: bool) -> Job:
    """`job` once it has ended, or as it is when the wait is over (`watch`'s); read afresh
    first with `read_first` (a job found before the watch began may have ended before it). If
    it cannot be read meanwhile, `job` as it was: the job stands, and a 5xx now would have the
    client submit it again where the 202 (or the replay's 200) has it poll the job."""
    session = db()

    def read() -> list[Job]:
        return [job_service.get_job(session=db(), job_id=job.id, client_id=_scope())]

    try:
        # populate_existing: the session holds the job as found; an expired copy would not
        # survive a failed read (it stays as found until the new row has been fetched).
        first = session.get(Job, job.id, populate_existing=True) if read_first else job
        (done,) = watch.until_ended(session=session, jobs=[first or job], read=read)
    except SQLAlchemyError:
        log.warning("could not read job %s while waiting", job.id, exc_info=True)
        return job
    return done


def _ended_answer(job: Job, headers: dict[str, str]) -> tuple[Response, int, dict[str, str]]:
    """201 for a submit whose `?wait=` saw its job end: the job's JSON or, for a succeeded job
    and `Accept: image/png`, its mask PNG (the JSON if the mask cannot be read: the job stands,
    and its JSON says where the mask is)."""
    if job.job_status == JobStatus.SUCCEEDED and _wants_png():
        try:
            mask = _mask_answer(str(job.id))
        except Exception:
            log.warning("could not read job %s's mask; answering its JSON", job.id, exc_info=True)
        else:
            return mask, 201, {**headers, "X-Job-Id": str(job.id)}
    return jsonify(job_body(job)), 201, headers


def _wants_png() -> bool:
    """The client prefers the mask itself to the job's JSON (`Accept: image/png`)."""
    best = request.accept_mimetypes.best_match(["application/json", "image/png"])
    return best == "image/png"


def _mask_answer(job_id: str) -> Response:
    """The mask PNG of a succeeded job: `mask.png`'s answer, and a finished submit's for
    `Accept: image/png`."""
    data = job_service.read_mask_png(
        session=db(), job_id=job_id, client_id=_scope(), store=blob_store(settings())
    )
    return _png(data, job_id, "mask")


# A batch's 16 photos are read into memory and decoded, their model inputs kept until they are
# stored; two batches at a time per process keep both cores busy decoding while an API process
# stays within its memory budget (later ones wait their turn, holding only a thread). The turn
# is taken once the body has been received and paid for: werkzeug spools each part over 500 KB
# to a file as it arrives, so an upload in progress holds little memory, and a turn taken before
# it let one key's two stalled uploads (a few bytes sent, no token spent) hold both turns, and
# every other key's batch got a 503. A key has one turn at a time (`KEY_BATCH_TURNS`), so it
# cannot hold both either; its others wait behind it, past KEY_BATCH_QUEUE of them a 429. A
# turn (the key's, then the process's) is waited for BATCH_TURN_WAIT_S at most, then 503.
BATCH_TURN_WAIT_S = 5.0
KEY_BATCH_QUEUE = 4


class BatchesBusyError(UnavailableError):
    code = "batches_busy"


class OwnBatchesPendingError(RateLimitedError):
    code = "batches_pending"


@bp.post("/jobs/batch")
def submit_batch() -> tuple[Response, int] | tuple[Response, int, dict[str, str]]:
    """Submit several images at once (repeat the field 'image'): all are accepted, or none.

    One request, one transaction and one queue message for the lot; each image becomes its own
    job (poll them together with `GET /v1/jobs?ids=`). Webhook fields apply to every job."""
    uploads = _received_uploads()
    refused = _charge(cost=len(uploads), batch=True)
    with refunded_if_refused(len(uploads) if refused is None else 0), ExitStack() as taking:
        taking.enter_context(batch_turn())
        turn = taking.pop_all()  # held past the refund's block: only taking it is refunded
    with turn:
        return _submit_batch(uploads, refused)


def _received_uploads() -> list[FileStorage]:
    """The batch's image parts, once its whole body has been received and checked."""
    cfg = settings()
    request.max_content_length = cfg.batch_submit_max_bytes + MULTIPART_OVERHEAD
    uploads = request.files.getlist("image")
    check_files_are_files("image")
    if not uploads:
        raise BadRequestError("Send the images as multipart/form-data, each in a field 'image'.")
    if len(uploads) > cfg.batch_submit_max_images:
        raise ValidationError(
            f"{len(uploads)} images in one batch; the limit is {cfg.batch_submit_max_images}."
        )
    _check_part_names()
    check_fields_are_text("webhook", "webhook_events")
    check_single("webhook")
    return uploads


BATCHES_AT_ONCE = FairTurn(2)
KEY_BATCH_TURNS = KeyTurns(
    queue=KEY_BATCH_QUEUE,
    busy=BatchesBusyError,
    pending=OwnBatchesPendingError,
    what="batch submits",
)


@contextmanager
def batch_turn() -> Iterator[None]:
    """One of the process's batch turns (up to BATCH_TURN_WAIT_S), after this key's own
    earlier batch (`KEY_BATCH_TURNS`): a key holds one turn at a time."""
    with (
        KEY_BATCH_TURNS.hold(_turn_key(), BATCH_TURN_WAIT_S),
        turn(
            BATCHES_AT_ONCE,
            BATCH_TURN_WAIT_S,
            BatchesBusyError,
            "This server is processing as many batch submits as it takes at once; retry shortly.",
        ),
    ):
        yield


def _submit_batch(
    uploads: list[FileStorage], refused: RateLimitedError | None
) -> tuple[Response, int] | tuple[Response, int, dict[str, str]]:
    """A received, paid-for batch, in its turn: read, replayed or decoded, stored."""
    datas = [_read(upload) for upload in uploads]
    idem, replay = _find_replay(datas, batch=True)  # before the decodes, as in submit_job
    if replay:
        return _replayed(replay, batch=True)
    if refused is not None:
        raise refused
    images = []
    for index, (upload, data) in enumerate(zip(uploads, datas, strict=True)):
        try:
            images.append(_validate(data))
        except SegError as exc:  # say which image, keep the status and code
            exc.message = f"Image {index} ({upload.filename or 'no file name'}): {exc.message}"
            raise
    keys = idempotency.batch_keys(idem, len(images)) if idem else None
    jobs = _store_and_enqueue(images, idem, keys, _webhook(), None)
    return jsonify({"jobs": [accepted_body(job) for job in jobs]}), 202


@bp.get("/jobs")
def read_jobs() -> Response:
    """Several jobs at once (`?ids=a,b,...`, up to 100), in the order asked; `?wait=S`
    long-polls until every one has ended. Ids this key cannot see are listed in `not_found`."""
    ids = job_service.parse_job_ids(query_arg("ids"))
    seconds = job_service.parse_wait(query_arg("wait"))
    cfg = settings()
    jobs = job_service.wait_for_jobs(
        session=db(),
        job_ids=ids,
        client_id=_scope(),
        seconds=seconds,
        redis_url=cfg.effective_redis_url,
        max_waiters=cfg.long_poll_max_waiters,
    )
    found = {job.id for job in jobs}
    return jsonify(
        {
            "jobs": [job_body(job) for job in jobs],
            "not_found": [str(jid) for jid in ids if jid not in found],
        }
    )


def _charge(*, cost: int, batch: bool) -> RateLimitedError | None:
    """Take the request's submission tokens. Over the rate, a keyed retry of a request that
    stored its jobs already gets the refusal back instead of raising it: it may still be
    answered with its replay (`_find_replay`), which stores nothing. A client whose 202
    was lost must not be refused its own jobs' ids for the rate it paid once."""
    client_id = current_client().id
    try:
        limits.check_rate(client_key=str(client_id), settings=settings(), cost=cost)
    except RateLimitedError as refused:
        raw_key = request.headers.get("Idempotency-Key")
        if raw_key is None:
            raise
        session = db()
        stored = idempotency.key_has_jobs(
            session=session, client_id=client_id, raw_key=raw_key, batch=batch
        )
        # Ends the lookup's transaction before a single submit's body is read (as
        # `authenticate_request` does): a slow upload must not hold a pooled connection idle
        # in a transaction, which Postgres ends at SEG_DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
        # turning this client's replay into a 503.
        session.rollback()
        if not stored:
            raise
        return refused
    return None


def _find_replay(
    datas: list[bytes], *, batch: bool
) -> tuple[idempotency.IdempotentRequest | None, list[Job] | None]:
    """The request's Idempotency-Key fingerprint (None without a key) and the jobs an earlier
    request with that key and body stored (None: none). Keyed by the uploads' sha256, never a
    decode: a retry over its rate must not buy unmetered decodes, nor wait for a large one."""
    raw_key = request.headers.get("Idempotency-Key")
    if raw_key is None:
        return None, None
    digests = [hashlib.sha256(data).hexdigest() for data in datas]
    idem = idempotency.parse_request(
        raw_key,
        image_sha256=digests if batch else digests[0],
        fields=request.form.items(multi=True),
    )
    if idem is None:
        return None, None
    session, client_id = db(), current_client().id
    if batch:
        jobs = idempotency.find_batch_replay(
            session=session, client_id=client_id, req=idem, count=len(datas)
        )
        return idem, jobs
    job = idempotency.find_replay(session=session, client_id=client_id, req=idem)
    return idem, [job] if job is not None else None


def _replayed(
    jobs: list[Job], *, batch: bool, wait: float = 0.0
) -> tuple[Response, int, dict[str, str]]:
    """An Idempotency-Key replay: the jobs the first request stored, 200. A single submit's
    replay answers its `?wait=` as the first request did: a job that ends within it is its 201
    (the finished job, or its mask PNG for `Accept: image/png`), so a client whose answer was
    lost gets the same kind of answer again, not a short JSON saved as its mask."""
    headers = {"Idempotent-Replayed": "1"}
    if batch:
        return jsonify({"jobs": [accepted_body(job) for job in jobs]}), 200, headers
    job = jobs[0]
    headers["Location"] = accepted_body(job)["urls"]["self"]
    if wait > 0:
        with _watch([job.id], wait) as watch:
            job = _until_ended(watch, job, read_first=True)
        if job.job_status.is_terminal:
            return _ended_answer(job, headers)
    return jsonify(accepted_body(job)), 200, headers


def check_files_are_files(name: str) -> None:
    """Refuse a part `name` sent without a filename: werkzeug files it as a text field, where
    it would be ignored (a batch would store the other images and answer 202)."""
    if name in request.form:
        raise BadRequestError(
            f"The part {name!r} came without a filename, so it is not a file upload; send "
            f"it as a file (curl -F {name}=@photo.jpg)."
        )


def check_fields_are_text(*names: str) -> None:
    """Refuse a text field sent as a file upload (a part with a filename): werkzeug files it
    in `request.files`, where the form never sees it (a job would be stored without its
    webhook)."""
    for name in names:
        if name in request.files:
            raise BadRequestError(
                f"The part {name!r} came as a file upload (with a filename); send it as a "
                f"text field (curl -F '{name}=value')."
            )


def _check_part_names() -> None:
    if None in request.form or None in request.files:  # werkzeug keeps nameless parts as None
        raise BadRequestError("Every multipart part needs a name (RFC 7578).")


def query_arg(name: str) -> str | None:
    """A single-valued query parameter; sent twice it is refused (`.get()` would silently use
    the first: `?ids=a&ids=b` answered for `a` alone)."""
    values = request.args.getlist(name)
    if len(values) > 1:
        hint = " List several ids in one, separated by commas." if name == "ids" else ""
        raise ValidationError(f"The query parameter {name!r} was sent more than once.{hint}")
    return values[0] if values else None


def check_single(*names: str) -> None:
    """Refuse a repeated single-valued field (`.get()` would silently use the first)."""
    for name in names:
        if len(request.files.getlist(name)) + len(request.form.getlist(name)) > 1:
            hint = " Use POST /v1/jobs/batch for several images." if name == "image" else ""
            raise ValidationError(f"The field {name!r} was sent more than once.{hint}")


def _read(upload: FileStorage) -> bytes:
    """An upload's bytes, one past the size limit at most (`validate_image` refuses those)."""
    data: bytes = upload.read(settings().max_upload_bytes + 1)
    return data


def _validate(data: bytes) -> ValidatedImage:
    cfg = settings()
    return validate_image(
        data,
        max_bytes=cfg.max_upload_bytes,
        max_pixels=cfg.max_pixels,
        large_decode=large_decode_turn,
    )


def _webhook() -> webhook_service.Subscription:
    return webhook_service.parse_subscription(
        session=db(),
        url=request.form.get("webhook"),
        events=request.form.getlist("webhook_events"),
        settings=settings(),
        client_id=current_client().id,
    )


def _store_and_enqueue(
    images: list[ValidatedImage],
    idem: idempotency.IdempotentRequest | None,
    keys: list[str] | None,
    hook: webhook_service.Subscription,
    job_ids: list[uuid.UUID] | None,
) -> list[Job]:
    """Admit, store and commit one job per image (named `job_ids`, else new ids), then send
    their ids as one message."""
    cfg, session = settings(), db()
    limits.check_admission(session=session, settings=cfg, cost=len(images))
    with idempotency.race_guard(session=session, req=idem):
        jobs = job_service.create_jobs(
            session=session,
            images=images,
            client_id=current_client().id,
            request_id=request.headers.get("X-Request-ID"),
            idempotency_keys=keys,
            request_fingerprint=idem.fingerprint if idem else None,
            webhook_url=hook.url,
            webhook_events=hook.events,
            store=blob_store(cfg),
            job_ids=job_ids,
        )
    session.commit()
    job_ids = [job.id for job in jobs]
    try:
        enqueue_jobs(celery(), job_ids, settings=cfg)
    except Exception:  # the jobs are stored; the reconciler enqueues them when the broker is back
        log.warning(
            "enqueue failed for jobs %s; left for the reconciler",
            ", ".join(map(str, job_ids)),
            exc_info=True,
        )
    return jobs


@bp.get("/jobs/<job_id>")
def read_job(job_id: str) -> Response:
    """The job's state, timings and links; `?wait=S` long-polls up to S seconds for the end."""
    seconds = job_service.parse_wait(query_arg("wait"))
    return jsonify(job_body(_wait_for_end(job_id, seconds)))


@bp.get("/jobs/<job_id>/mask.png")
def read_mask(job_id: str) -> Response:
    """The class mask (0 pet, 1 background, 2 border) at the input's size."""
    return _mask_answer(job_id)


# A full-size decode of a large picture (an overlay, a PNG or WebP upload; over
# LARGE_DECODE_PIXELS) takes ~10 bytes of memory per pixel at its peak, ~420 MB for the largest
# upload accepted (SEG_MAX_PIXELS, 40 MP). Those run one at a time per process (a later one
# waits up to LARGE_DECODE_WAIT_S, then 503 + Retry-After), so a few large pictures at once
# cannot take an API process past its memory limit; the usual photo never waits.
LARGE_DECODE_WAIT_S = 10.0
LARGE_DECODES_AT_ONCE = FairTurn()
# A key's large decodes queue behind each other before the process's turn, so one key has one
# request at a time in the turn's queue: a key asking for its own 40 MP overlays (or sending
# large PNGs) from several threads held the one turn for as long as it liked, and another
# client's large picture waited, then got a 503. Its own wait as long as KEY_TURN_WAIT_S, so
# that a client drawing a folder's 12 MP overlays four at a time gets them one after the
# other; past KEY_TURN_QUEUE waiting, it is told to slow down (429), not given more threads.
KEY_TURN_WAIT_S = 60.0
KEY_TURN_QUEUE = 4


class LargeDecodesBusyError(UnavailableError):
    code = "large_decodes_busy"


class OwnLargeDecodesPendingError(RateLimitedError):
    code = "large_decodes_pending"


KEY_TURNS = KeyTurns(
    queue=KEY_TURN_QUEUE,
    busy=LargeDecodesBusyError,
    pending=OwnLargeDecodesPendingError,
    what="large pictures",
)


@contextmanager
def large_decode_turn() -> Iterator[None]:
    """The process's large-decode turn (up to LARGE_DECODE_WAIT_S), after this key's own
    earlier large decodes (`KEY_TURNS`): for uploads, feedback masks and overlays alike."""
    with (
        KEY_TURNS.hold(_turn_key(), KEY_TURN_WAIT_S),
        turn(
            LARGE_DECODES_AT_ONCE,
            LARGE_DECODE_WAIT_S,
            LargeDecodesBusyError,
            "This server is decoding another large picture; retry shortly.",
        ),
    ):
        yield


class OverlaysBusyError(UnavailableError):
    code = "overlays_busy"


# Overlays of any size draw from this budget (~10 bytes a pixel at the peak of a full-size
# decode, blend and PNG encode: ~80 MB at most in flight): 24 threads drawing one client's
# 4 MP overlay at once took two API processes to 2 GB. Pet photos (0.2 MP) draw 40 at once.
OVERLAY_PIXELS_AT_ONCE = PixelBudget(8_000_000, busy=OverlaysBusyError)
# An overlay over this takes a submission token and the key's turn (`KEY_TURNS`): a key asking
# for its own 4 MP overlay again and again, free, two in flight at once, filled the budget, and
# another key's 1 MP overlay waited, then got a 503. A usual photo's (0.2 MP) stays free.
METERED_OVERLAY_PIXELS = 1_000_000


@bp.get("/jobs/<job_id>/overlay.png")
def read_overlay(job_id: str) -> Response:
    """The input with the mask blended on it, drawn in its turn (`overlay_turn`); one over
    METERED_OVERLAY_PIXELS takes one of the key's submission tokens."""
    cfg = settings()
    session, scope, store = db(), _scope(), blob_store(cfg)
    job = job_service.get_finished_job(session=session, job_id=job_id, client_id=scope)
    pixels = job.input_width * job.input_height
    cost = 0
    if pixels > min(METERED_OVERLAY_PIXELS, LARGE_DECODE_PIXELS):  # a large one always
        limits.check_rate(client_key=str(current_client().id), settings=cfg)
        cost = 1
    with refunded_if_refused(cost), ExitStack() as taking:
        taking.enter_context(overlay_turn(pixels))
        turn = taking.pop_all()  # held past the refund's block: only taking it is refunded
    with turn:
        data = job_service.read_overlay_png(
            session=session, job_id=job_id, client_id=scope, store=store
        )
    return _png(data, job_id, "overlay")


@contextmanager
def refunded_if_refused(cost: int) -> Iterator[None]:
    """Give the request's `cost` tokens back when taking its turn (the block) refuses it: a
    503 busy or a 429 `*_pending` tells the client to send it again, nothing was done, and its
    retry must not be refused for the rate this try paid."""
    try:
        yield
    except SegError:
        if cost:
            limits.refund_rate(client_key=str(current_client().id), settings=settings(), cost=cost)
        raise


@contextmanager
def overlay_turn(pixels: int) -> Iterator[None]:
    """An overlay's turn. Over LARGE_DECODE_PIXELS, the process's large-decode turn behind the
    key's own (a key asking again and again for its own 40 MP overlay would otherwise hold the
    turn for as long as it liked); else its pixels from the process's budget, over
    METERED_OVERLAY_PIXELS behind the key's own (one of them in the budget at a time). A large
    one never holds the budget: none holds one while it waits for the other."""
    if pixels > LARGE_DECODE_PIXELS:
        with large_decode_turn():
            yield
    elif pixels > METERED_OVERLAY_PIXELS:
        with (
            KEY_TURNS.hold(_turn_key(), KEY_TURN_WAIT_S),
            OVERLAY_PIXELS_AT_ONCE.hold(pixels, LARGE_DECODE_WAIT_S),
        ):
            yield
    else:
        with OVERLAY_PIXELS_AT_ONCE.hold(pixels, LARGE_DECODE_WAIT_S):
            yield


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    """Cancel a queued job (a running one stops at its next batch boundary)."""
    session = db()
    job = job_service.cancel_job(session=session, job_id=job_id, client_id=_scope())
    session.commit()
    if job.job_status.is_terminal:
        notify.publish_finished(settings().effective_redis_url, [job.id])
    return jsonify(job_body(job))


def _wait_for_end(job_id: str, seconds: float) -> Job:
    """The job once it ends, or as it is after `seconds` (a long poll; 0: at once)."""
    cfg = settings()
    return job_service.wait_for_job(
        session=db(),
        job_id=job_id,
        client_id=_scope(),
        seconds=seconds,
        redis_url=cfg.effective_redis_url,
        max_waiters=cfg.long_poll_max_waiters,
    )


def _watch(job_ids: list[uuid.UUID], seconds: float) -> ContextManager[job_service.JobWatch]:
    """These jobs' end notices for up to `seconds` (0: none), under the process's limit."""
    cfg = settings()
    return job_service.watch_jobs(
        job_ids,
        seconds=seconds,
        redis_url=cfg.effective_redis_url,
        max_waiters=cfg.long_poll_max_waiters,
    )


def _scope() -> uuid.UUID | None:
    """Which client's jobs the caller may see (None when auth is off)."""
    return current_client().id


def _turn_key() -> str | None:
    """Whose turns a request waits behind: its key's; None without authentication (every
    caller is the same anonymous client then, and one caller's batch must not hold the rest's
    turn nor count against their queue: the process's turns alone apply)."""
    client_id = current_client().id
    return None if client_id is None else str(client_id)


def _png(data: bytes, job_id: str, kind: str) -> Response:
    resp = Response(data, mimetype="image/png")
    name = job_service.parse_job_id(job_id)  # found already: its canonical form
    resp.headers["Content-Disposition"] = f'inline; filename="{name}-{kind}.png"'
    resp.headers["Cache-Control"] = "private, max-age=86400, immutable"
    return resp
