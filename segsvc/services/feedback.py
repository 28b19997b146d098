"""User feedback on jobs: ratings and corrected masks (training labels), and input retention."""

from __future__ import annotations

import io
import logging
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta

from PIL import Image, UnidentifiedImageError
from sqlalchemy import func, literal, select, update
from sqlalchemy.orm import Session

from segsvc import images
from segsvc.blobs import (
    POINTER_LENGTH,
    BlobMissingError,
    BlobStore,
    pointer_digest,
    pointer_to,
)
from segsvc.errors import BadRequestError, ConflictError, NotFoundError, SegError
from segsvc.ml import NUM_CLASSES
from segsvc.ml.imaging import mask_classes
from segsvc.models import Feedback, Job, JobStatus, db_clock, db_time
from segsvc.services.jobs import get_job
from segsvc.services.retention import (
    ENDED,
    Cleared,
    has_mask_label,
    lock_chunk,
    resume_after,
)

log = logging.getLogger(__name__)

RATINGS = ("good", "bad")
# PIL modes that hold one value per pixel (palette images count: the index is the value).
SINGLE_CHANNEL_MODES = {"L", "P", "I", "I;16", "I;16B", "I;16L"}


class InvalidMaskError(SegError):
    """A corrected mask that is not a single-channel PNG of the job's size with values 0..2."""

    code = "invalid_mask"
    http_status = 422


class InvalidRatingError(SegError):
    code = "invalid_rating"
    http_status = 422


def validate_mask(
    data: bytes,
    *,
    width: int,
    height: int,
    large_decode: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> None:
    """Decode a corrected mask and check its format, size and class values (Pillow only: the
    API does not load NumPy). A mask over LARGE_DECODE_PIXELS decodes inside
    `large_decode()`, as an upload that size does (1-2 bytes per pixel, but a server bounds
    every large decode the same way)."""

    if not data:
        raise BadRequestError("The uploaded mask file is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidMaskError("The mask is not a readable image; send a PNG.") from None
    with img:
        if img.format != "PNG":
            raise InvalidMaskError(f"The mask must be a PNG, not {img.format or 'unknown'}.")
        if img.mode not in SINGLE_CHANNEL_MODES:
            raise InvalidMaskError(f"The mask must be single-channel (8-bit grey), not {img.mode}.")
        # Checked before decoding the pixels, so an oversized mask costs nothing.
        if img.size != (width, height):
            raise InvalidMaskError(
                f"The mask is {img.width}x{img.height}; the job's input is {width}x{height}."
            )
        with large_decode() if width * height > images.LARGE_DECODE_PIXELS else nullcontext():
            try:
                bad = _values_out_of_range(mask_classes(img))
            except (OSError, ValueError, SyntaxError):
                raise InvalidMaskError("The mask PNG could not be decoded.") from None
    if bad:
        shown = ", ".join(str(v) for v in bad[:5])
        raise InvalidMaskError(
            f"Mask values must be 0 (pet), 1 (background) or 2 (border); found {shown}."
        )


def _values_out_of_range(img: Image.Image) -> list[int]:
    """The pixel values (palette indices for P) that are not a class, in ascending order; for
    16/32-bit masks the lowest and highest such value."""
    if img.mode in ("L", "P"):
        counts = img.histogram()
        return [value for value in range(NUM_CLASSES, len(counts)) if counts[value]]
    bad: set[int] = set()
    # One band: (lowest, highest), read as decoded (16-bit masks are not widened to 32 bits).
    for value in img.getextrema():
        if isinstance(value, int) and not 0 <= value < NUM_CLASSES:
            bad.add(value)
    return sorted(bad)


def validate_rating(rating: str | None) -> str | None:
    """A normalised rating or None; anything but good/bad is an error."""
    if rating is None or not rating.strip():
        return None
    value = rating.strip().lower()
    if value not in RATINGS:
        raise InvalidRatingError(f"rating must be good or bad, not {rating[:20]!r}.")
    return value


def submit_feedback(
    *,
    session: Session,
    job_id: str | uuid.UUID,
    client_id: uuid.UUID | None,
    mask_png: bytes | None = None,
    rating: str | None = None,
    large_decode: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> Feedback:
    """Validate and store feedback for a finished job of `client_id` (None: any); a large
    mask decodes inside `large_decode()` (see `validate_mask`)."""
    value = validate_rating(rating)
    if mask_png is None and value is None:
        raise BadRequestError(
            "Send a corrected mask (multipart file 'mask') and/or a 'rating' (good or bad)."
        )
    job = get_job(session=session, job_id=job_id, client_id=client_id)
    if job.status != JobStatus.SUCCEEDED:
        raise ConflictError(f"Job {job.id} is {job.status}; feedback is for succeeded jobs.")
    if mask_png is not None:
        validate_mask(
            mask_png, width=job.input_width, height=job.input_height, large_decode=large_decode
        )
    has_input = _lock_job(session=session, job_id=job.id)
    if has_input is None:  # row retention deleted it since it was read
        raise NotFoundError(f"No job {job.id}.")
    if mask_png is not None:
        if not has_input:
            raise ConflictError(f"Job {job.id}'s input is no longer kept; a mask cannot be used.")
        # Training uses a job's newest mask only: an older one is dead weight (a client fixing
        # its correction many times would otherwise store every copy for ever).
        session.execute(
            update(Feedback)
            .where(Feedback.job_id == job.id, Feedback.mask_png.is_not(None))
            .values(mask_png=None)
            .execution_options(synchronize_session=False)
        )
    row = Feedback(
        job_id=job.id,
        client_id=job.client_id,
        model_version=job.model_version,
        rating=value,
        mask_png=mask_png,
        created_at=db_clock(session),
    )
    session.add(row)
    session.flush()
    return row


def _lock_job(*, session: Session, job_id: uuid.UUID) -> bool | None:
    """Whether the job keeps its input (None: the job is gone), its row locked to this
    transaction's end: a retention pass that cleared the input or deleted the row first is
    waited for (then this reads what it left), and one that comes later skips the job until
    the feedback has committed (`purge_unlabeled_chunk`, `retention.delete_ended_jobs_chunk`)."""
    query = select(Job.input_bytes.is_not(None)).where(Job.id == job_id).with_for_update()
    return session.scalar(query)


def labeled_feedback_ids(*, session: Session) -> list[uuid.UUID]:
    """The newest corrected mask of every job whose input is still kept, oldest first."""
    newest = (
        select(Feedback.job_id, func.max(Feedback.created_at).label("at"))
        .where(Feedback.mask_png.is_not(None))
        .group_by(Feedback.job_id)
        .subquery()
    )
    rows = session.execute(
        select(Feedback.id)
        .join(newest, (Feedback.job_id == newest.c.job_id) & (Feedback.created_at == newest.c.at))
        .join(Job, Job.id == Feedback.job_id)
        .where(Feedback.mask_png.is_not(None), Job.input_bytes.is_not(None))
        .order_by(Feedback.created_at, Feedback.id)
    ).all()
    return list(dict.fromkeys(r[0] for r in rows))


# Feedback ids per statement when labels are loaded: one bind parameter each (psycopg allows
# 65535), and the rows of one statement are streamed a few at a time (inputs are up to 10 MB).
LOAD_CHUNK = 500
LOAD_ROWS_AT_ONCE = 8


@dataclass(frozen=True)
class LabeledInput:
    """One label as training reads it: the upload, its digest and the corrected mask."""

    feedback_id: uuid.UUID
    input_sha256: str
    image: bytes | None  # None: its input file is missing or damaged (`SEG_BLOB_STORE=fs`)
    mask_png: bytes


def iter_labeled_inputs(
    *,
    session: Session,
    feedback_ids: Sequence[uuid.UUID],
    store: BlobStore | None = None,
    chunk: int | None = None,
) -> Iterator[LabeledInput]:
    """The labels of `feedback_ids` (oldest first, as `labeled_feedback_ids` gives them) that
    still have both their mask and their input, in that order, `chunk` (LOAD_CHUNK) ids per
    statement, each row read when the caller asks for it: a caller that
    keeps only what it derives holds a few inputs at a time, never every label ever given."""
    chunk = chunk or LOAD_CHUNK
    for start in range(0, len(feedback_ids), chunk):
        rows = session.execute(
            select(Feedback.id, Job.input_sha256, Feedback.mask_png, Job.input_bytes)
            .join(Job, Job.id == Feedback.job_id)
            .where(
                Feedback.id.in_(list(feedback_ids[start : start + chunk])),
                Feedback.mask_png.is_not(None),
                Job.input_bytes.is_not(None),
            )
            .order_by(Feedback.created_at, Feedback.id)
            .execution_options(yield_per=LOAD_ROWS_AT_ONCE)
        )
        for fid, digest, mask, stored in rows:
            try:
                image = store.get(stored) if store is not None else stored  # fs: a file pointer
            except BlobMissingError as exc:
                # Lost or damaged on disk: one label less, not every run. A store that cannot
                # be read at all (BlobStoreUnavailableError) fails the run instead, its labels
                # still new for the next one: dropping them all, a run trained, gated and
                # canaried a candidate on none of them, and marked them used.
                log.warning(
                    "feedback %s: its input file is missing or damaged; left out (%s)", fid, exc
                )
                image = None
            yield LabeledInput(fid, digest, bytes(image) if image else None, bytes(mask or b""))


PURGE_CHUNK = 1000


def purge_cutoff(*, session: Session, retention_days: int, now: datetime | None = None) -> datetime:
    """Jobs created before this are past the retention (on the jobs' clock, the database's)."""
    return (now or db_time(session)) - timedelta(days=retention_days)


def purge_unlabeled_chunk(
    *, session: Session, cutoff: datetime, after: tuple[datetime, uuid.UUID] | None = None
) -> Cleared:
    """Delete the stored inputs of up to PURGE_CHUNK finished jobs created before `cutoff`
    with no mask label, walking them in (created_at, id) order from `after`. The caller
    commits each chunk (`retrain.tasks.purge_inputs`): a pass over a large backlog then holds
    the locks of one chunk at a time, and no chunk reads again the rows an earlier one passed
    (labeled ones stay in the index for ever).

    A chunk of rows is locked first and cleared by a second statement: one statement's
    `NOT EXISTS` sees only the masks committed before it began, so a mask committed while it
    waited for the row would not stop it. A row a mask's transaction holds (it locks the job
    while it checks the input) is skipped, to the next pass if it is still unlabeled then.
    """
    labeled = has_mask_label()
    query = select(
        Job.id, Job.created_at, Job.input_sha256, func.length(Job.input_bytes) == POINTER_LENGTH
    ).where(
        Job.created_at < cutoff,
        Job.status.in_(ENDED),
        Job.input_bytes.is_not(None),
        ~labeled,
    )
    locked = session.execute(lock_chunk(query, after=after, size=PURGE_CHUNK)).all()
    # A file pointer's digest is the upload's sha256 (content-addressed), already in the row.
    pointers = {job_id: digest for job_id, _, digest, is_pointer in locked if is_pointer}
    cleared = session.scalars(
        update(Job)
        .where(Job.id.in_([row[0] for row in locked]), ~labeled)
        # Their idempotency keys too (a month past their 24 h window): the unique indexes on
        # keys would otherwise keep an entry for every keyed job ever submitted.
        .values(input_bytes=None, model_input=None, idempotency_key=None, request_fingerprint=None)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    files = sorted({pointers[job_id] for job_id in cleared if job_id in pointers})
    return Cleared(len(cleared), files, resume_after(locked, PURGE_CHUNK))


def purge_unlabeled_inputs(
    *, session: Session, retention_days: int, now: datetime | None = None
) -> Cleared:
    """A whole retention pass in the caller's one transaction (chunk after chunk): for small
    tables and tests; the scheduled task commits chunk by chunk instead."""
    cutoff = purge_cutoff(session=session, retention_days=retention_days, now=now)
    jobs, files, after = 0, set[str](), None
    while True:
        chunk = purge_unlabeled_chunk(session=session, cutoff=cutoff, after=after)
        jobs += chunk.jobs
        files.update(chunk.files)
        if chunk.resume is None:
            return Cleared(jobs, sorted(files))
        after = chunk.resume


def blobs_in_use(*, session: Session, digests: Sequence[str]) -> set[str]:
    """Which of these blob files a job still names: as its kept input (an identical upload
    shares the file) or as its result mask (an upload byte-identical to a mask names the
    mask's file: uploads and masks share the folder)."""
    used: set[str] = set()
    is_pointer = func.length(Job.mask_png) == literal(POINTER_LENGTH, literal_execute=True)
    for start in range(0, len(digests), 1000):
        chunk = list(digests[start : start + 1000])
        used.update(
            session.scalars(
                select(Job.input_sha256)
                .where(Job.input_sha256.in_(chunk), Job.input_bytes.is_not(None))
                .distinct()
            )
        )
        masks = session.scalars(  # the partial index ix_jobs_mask_pointer (its constant: 83)
            select(Job.mask_png)
            .where(is_pointer, Job.mask_png.in_([pointer_to(d) for d in chunk]))
            .distinct()
        )
        used.update(pointer_digest(value) for value in masks if value is not None)
    return used
