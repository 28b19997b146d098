"""Feedback validation, storage with the serving version, the label snapshot and retention."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from segsvc.blobs import BlobStore
from segsvc.db import session_scope
from segsvc.errors import BadRequestError, ConflictError, NotFoundError
from segsvc.images import validate_image
from segsvc.models import Feedback, Job, JobStatus, utcnow
from segsvc.services import feedback
from segsvc.services.feedback import InvalidMaskError, InvalidRatingError, validate_mask
from segsvc.services.jobs import create_job
from segsvc.settings import Settings
from tests.conftest import encode_image


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    return encode_image(Image.fromarray(array, mode))


def photo_bytes(width: int = 80, height: int = 60, seed: int = 0) -> bytes:
    """A small random JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    return encode_image(Image.fromarray(pixels), "JPEG")


def good_mask(width: int = 80, height: int = 60) -> bytes:
    mask = np.ones((height, width), np.uint8)
    mask[10:40, 20:60] = 2
    mask[13:37, 23:57] = 0
    return png(mask)


def load_samples(
    *, session: Session, feedback_ids: Sequence[uuid.UUID], store: BlobStore | None = None
) -> list[tuple[bytes, bytes]]:
    """(input image bytes, corrected mask PNG) of each label `feedback.iter_labeled_inputs`
    reads whole (its input present and intact), as training gets them."""
    return [
        (item.image, item.mask_png)
        for item in feedback.iter_labeled_inputs(
            session=session, feedback_ids=feedback_ids, store=store
        )
        if item.image is not None
    ]


def make_job(
    settings: Settings,
    *,
    client_id: uuid.UUID | None = None,
    version: str | None = "test-v1",
    status: JobStatus = JobStatus.SUCCEEDED,
    image: bytes | None = None,
    age_days: float = 0,
) -> uuid.UUID:
    """A stored job, finished by `version` unless another status is asked for."""
    data = image or photo_bytes()
    with session_scope(settings) as session:
        job = create_job(
            session=session,
            client_id=client_id,
            image=validate_image(data, max_bytes=10**7, max_pixels=10**8),
        )
        job.status = status
        job.created_at = utcnow() - timedelta(days=age_days)
        if status == JobStatus.SUCCEEDED:
            job.model_version, job.completed_at = version, utcnow()
            job.predict_ms, job.queue_ms, job.batch_size = 10.0, 1.0, 1
        return job.id


def test_validate_mask_accepts_single_channel_png_of_the_input_size() -> None:
    validate_mask(good_mask(), width=80, height=60)  # no error


def test_validate_mask_reads_palette_and_16_bit_masks() -> None:
    classes = np.tile(np.arange(80) % 3, (60, 1)).astype(np.uint8)
    palette = Image.fromarray(classes, "L")
    palette.putpalette([0, 0, 0, 9, 9, 9, 200, 200, 200])  # mode P: the index is the class
    validate_mask(encode_image(palette), width=80, height=60)
    for values, error in ((classes.astype(np.uint16), None), (classes + np.uint16(300), "300")):
        data = encode_image(Image.fromarray(values.astype(np.uint16)))  # 16-bit grey PNG
        if error is None:
            validate_mask(data, width=80, height=60)
        else:
            with pytest.raises(InvalidMaskError, match=f"found {error}"):
                validate_mask(data, width=80, height=60)


def test_a_grey_mask_saved_with_a_reordered_palette_keeps_its_classes() -> None:
    """An editor or optimiser re-saving the served grey mask as a palette PNG may put grey 2
    at index 0: read by index, every pet pixel became border and every border pixel pet."""
    from segsvc.ml.preprocess import decode_mask_png

    classes = np.tile(np.arange(80) % 3, (60, 1)).astype(np.uint8)
    quantized = Image.fromarray(classes, "L").quantize(3)
    assert quantized.getpalette()[:9] != [0, 0, 0, 1, 1, 1, 2, 2, 2]  # reordered
    data = encode_image(quantized)
    validate_mask(data, width=80, height=60)
    np.testing.assert_array_equal(decode_mask_png(data), classes)
    # A palette of display colours still means its indices.
    shown = Image.fromarray(classes, "L")
    shown.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    np.testing.assert_array_equal(decode_mask_png(encode_image(shown.convert("P"))), classes)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (png(np.zeros((60, 80, 3), np.uint8)), "single-channel"),
        (png(np.zeros((60, 81), np.uint8)), "81x60"),
        (png(np.full((60, 80), 3, np.uint8)), "found 3"),
        (png(np.full((60, 80), 255, np.uint8)), "found 255"),
        (photo_bytes(), "must be a PNG"),
        (b"not an image at all", "not a readable image"),
    ],
    ids=["rgb", "wrong-size", "value-3", "value-255", "jpeg", "garbage"],
)
def test_validate_mask_rejects_bad_masks_with_a_reason(data: bytes, needle: str) -> None:
    with pytest.raises(InvalidMaskError, match=needle) as info:
        validate_mask(data, width=80, height=60)
    assert info.value.http_status == 422


def test_validate_mask_empty_file_is_a_bad_request() -> None:
    with pytest.raises(BadRequestError):
        validate_mask(b"", width=80, height=60)


def test_submit_feedback_stores_mask_rating_and_serving_version(settings: Settings) -> None:
    job_id = make_job(settings, version="v-served")
    with session_scope(settings) as session:
        row = feedback.submit_feedback(
            session=session,
            job_id=str(job_id),
            client_id=None,
            mask_png=good_mask(),
            rating=" Good ",
        )
        assert (row.model_version, row.rating, row.job_id) == ("v-served", "good", job_id)
    with session_scope(settings) as session:
        assert feedback.labeled_feedback_ids(session=session) == [row.id]
        samples = load_samples(session=session, feedback_ids=[row.id])
    image, mask = samples[0]
    assert image == photo_bytes()
    assert mask == good_mask()


def two_labels_in_files(
    settings: Settings, tmp_path: Path
) -> tuple[Settings, BlobStore, list[uuid.UUID], Path]:
    """Settings with a file blob store, the store, two labels of two photos (seeds 0 and 1)
    stored there, and the path of the first photo's input file."""
    from segsvc.blobs import blob_store, pointer_digest
    from segsvc.services.jobs import create_jobs

    cfg = settings.model_copy(update={"blob_store": "fs", "blob_dir": tmp_path / "blobs"})
    store = blob_store(cfg)
    ids = []
    with session_scope(cfg) as session:
        for seed in (0, 1):
            image = validate_image(photo_bytes(seed=seed), max_bytes=10**7, max_pixels=10**8)
            job = create_jobs(session=session, client_id=None, images=[image], store=store)[0]
            job.status, job.model_version, job.completed_at = JobStatus.SUCCEEDED, "v", utcnow()
            ids.append(job.id)
    with session_scope(cfg) as session:
        labels = [
            feedback.submit_feedback(
                session=session, job_id=job_id, client_id=None, mask_png=good_mask()
            ).id
            for job_id in ids
        ]
        first = session.get(Job, ids[0])
        assert first is not None
        path = store.path_for(pointer_digest(bytes(first.input_bytes or b"")))
    return cfg, store, labels, path


def test_a_label_whose_input_file_is_gone_is_left_out_not_fatal(
    settings: Settings, tmp_path: Path
) -> None:
    # Regression: one missing or damaged input file raised out of the label loader, and every
    # retraining run failed on it until someone edited the database.
    cfg, store, labels, first_input = two_labels_in_files(settings, tmp_path)
    first_input.unlink()
    with session_scope(cfg) as session:
        samples = load_samples(session=session, feedback_ids=labels, store=store)
    assert samples == [(photo_bytes(seed=1), good_mask())]


def test_a_label_store_that_cannot_be_read_fails_the_load_not_drops_every_label(
    settings: Settings, tmp_path: Path
) -> None:
    """An input file that is there but cannot be read (EIO, EACCES, a stale NFS handle, the
    volume away) is the store unavailable, not one label lost: left out, every label of an
    outage was, and the run trained and canaried a candidate on none of them. The load fails
    (a 503-kind error the run reports), so the labels stay new for the next run."""
    from segsvc.blobs import BlobStoreUnavailableError

    cfg, store, labels, first_input = two_labels_in_files(settings, tmp_path)
    first_input.unlink()
    first_input.mkdir()  # there, but reading it fails with an OSError other than "not found"
    with session_scope(cfg) as session, pytest.raises(BlobStoreUnavailableError):
        load_samples(session=session, feedback_ids=labels, store=store)


def test_labels_are_loaded_in_chunks_of_ids(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every label ever given was read by one statement with a bind parameter per id (psycopg
    allows 65535) and held in memory at once; they are read LOAD_CHUNK ids per statement."""
    from sqlalchemy import event

    from segsvc.db import get_engine

    monkeypatch.setattr(feedback, "LOAD_CHUNK", 3)
    labels = []
    for seed in range(7):
        job_id = make_job(settings, image=photo_bytes(seed=seed))
        with session_scope(settings) as session:
            labels.append(
                feedback.submit_feedback(
                    session=session, job_id=job_id, client_id=None, mask_png=good_mask()
                ).id
            )
    statements: list[int] = []  # the number of bind parameters of each SELECT on feedback

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT") and "feedback" in statement:
            statements.append(len(parameters or ()))

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", count)
    try:
        with session_scope(settings) as session:
            samples = load_samples(session=session, feedback_ids=labels)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert [image for image, _ in samples] == [photo_bytes(seed=seed) for seed in range(7)]
    assert len(statements) == 3
    assert max(statements) <= 3


def test_submit_feedback_rejects_bad_rating_empty_request_and_unfinished_jobs(
    settings: Settings,
) -> None:
    done = make_job(settings)
    queued = make_job(settings, status=JobStatus.QUEUED)
    with session_scope(settings) as session:
        with pytest.raises(InvalidRatingError):
            feedback.submit_feedback(session=session, job_id=done, client_id=None, rating="meh")
        with pytest.raises(BadRequestError):
            feedback.submit_feedback(session=session, job_id=done, client_id=None)
        with pytest.raises(ConflictError):
            feedback.submit_feedback(session=session, job_id=queued, client_id=None, rating="bad")
        with pytest.raises(NotFoundError):
            feedback.submit_feedback(
                session=session, job_id=uuid.uuid4(), client_id=None, rating="bad"
            )


def test_labeled_feedback_ids_keeps_the_newest_mask_per_job(settings: Settings) -> None:
    job_id = make_job(settings)
    with session_scope(settings) as session:
        feedback.submit_feedback(
            session=session, job_id=job_id, client_id=None, mask_png=good_mask()
        )
        feedback.submit_feedback(session=session, job_id=job_id, client_id=None, rating="bad")
    with session_scope(settings) as session:
        newer = feedback.submit_feedback(
            session=session, job_id=job_id, client_id=None, mask_png=good_mask()
        )
    with session_scope(settings) as session:
        assert feedback.labeled_feedback_ids(session=session) == [newer.id]


def test_a_new_mask_drops_the_bytes_of_the_jobs_older_masks(settings: Settings) -> None:
    # Regression: every re-posted correction kept its PNG for ever, though only the newest
    # is ever used.
    job_id, other = make_job(settings), make_job(settings)
    with session_scope(settings) as session:
        first = feedback.submit_feedback(
            session=session, job_id=job_id, client_id=None, mask_png=good_mask(), rating="bad"
        ).id
        kept = feedback.submit_feedback(
            session=session, job_id=other, client_id=None, mask_png=good_mask()
        ).id
    with session_scope(settings) as session:
        rated = feedback.submit_feedback(
            session=session, job_id=job_id, client_id=None, rating="good"
        ).id
    with session_scope(settings) as session:
        newest = feedback.submit_feedback(
            session=session, job_id=job_id, client_id=None, mask_png=good_mask()
        ).id
    with session_scope(settings) as session:
        rows = {r.id: r for r in session.scalars(select(Feedback))}
        assert rows[first].mask_png is None
        assert rows[first].rating == "bad"  # the rating stays
        assert rows[rated].rating == "good"
        assert rows[newest].mask_png == good_mask()
        assert rows[kept].mask_png == good_mask()  # another job's mask is untouched
        assert feedback.labeled_feedback_ids(session=session) == [kept, newest]


def test_purge_unlabeled_inputs_deletes_only_old_unlabeled_inputs(settings: Settings) -> None:
    old_unlabeled = make_job(settings, age_days=40)
    old_rated = make_job(settings, age_days=40)
    old_labeled = make_job(settings, age_days=40)
    recent = make_job(settings, age_days=1)
    old_queued = make_job(settings, age_days=40, status=JobStatus.QUEUED)
    with session_scope(settings) as session:
        feedback.submit_feedback(session=session, job_id=old_rated, client_id=None, rating="good")
        feedback.submit_feedback(
            session=session, job_id=old_labeled, client_id=None, mask_png=good_mask()
        )
    with session_scope(settings) as session:
        assert feedback.purge_unlabeled_inputs(session=session, retention_days=30).jobs == 2
    with session_scope(settings) as session:
        kept = {
            jid: session.get(Job, jid).input_bytes is not None  # type: ignore[union-attr]
            for jid in (old_unlabeled, old_rated, old_labeled, recent, old_queued)
        }
        # A mask can no longer be given for a job whose input is gone.
        with pytest.raises(ConflictError, match="no longer kept"):
            feedback.submit_feedback(
                session=session, job_id=old_unlabeled, client_id=None, mask_png=good_mask()
            )
    assert kept == {
        old_unlabeled: False,
        old_rated: False,
        old_labeled: True,
        recent: True,
        old_queued: True,
    }


def input_kept(settings: Settings, job_id: uuid.UUID) -> bool:
    with session_scope(settings) as session:
        return session.scalar(select(Job.input_bytes.is_not(None)).where(Job.id == job_id)) is True


def test_a_mask_given_while_retention_runs_keeps_its_input(settings: Settings) -> None:
    """The mask's transaction checked the input and has not committed when the hourly purge
    runs: the purge leaves that job (it is labeled once the mask commits) instead of deleting
    the input the mask was accepted for."""
    job_id = make_job(settings, age_days=40)
    with session_scope(settings) as giving:
        feedback.submit_feedback(
            session=giving, job_id=job_id, client_id=None, mask_png=good_mask()
        )
        with session_scope(settings) as purging:
            purged = feedback.purge_unlabeled_inputs(session=purging, retention_days=30)
        assert purged.jobs == 0
    assert input_kept(settings, job_id)
    with session_scope(settings) as session:
        assert feedback.labeled_feedback_ids(session=session) != []


def test_a_mask_given_while_retention_deletes_its_input_is_refused(settings: Settings) -> None:
    """The purge cleared the input and has not committed when a mask arrives: the mask waits
    for it and is refused (409), not accepted for an input that is gone."""
    job_id = make_job(settings, age_days=40)
    outcome: list[object] = []

    def give_mask() -> None:
        try:
            with session_scope(settings) as giving:
                feedback.submit_feedback(
                    session=giving, job_id=job_id, client_id=None, mask_png=good_mask()
                )
            outcome.append("stored")
        except ConflictError as exc:
            outcome.append(exc)

    with session_scope(settings) as purging:
        assert feedback.purge_unlabeled_inputs(session=purging, retention_days=30).jobs == 1
        giver = threading.Thread(target=give_mask)
        giver.start()
        giver.join(0.5)
        assert outcome == []  # waiting for the purge to commit
    giver.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConflictError)
    assert not input_kept(settings, job_id)
    with session_scope(settings) as session:
        assert session.scalar(select(Feedback.id).where(Feedback.job_id == job_id)) is None


def test_purge_clears_chunk_after_chunk(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feedback, "PURGE_CHUNK", 2)
    old = [make_job(settings, age_days=40) for _ in range(5)]
    with session_scope(settings) as session:
        assert feedback.purge_unlabeled_inputs(session=session, retention_days=30).jobs == 5
    assert not any(input_kept(settings, job_id) for job_id in old)


def test_purge_releases_the_idempotency_keys_of_what_it_clears(settings: Settings) -> None:
    old, recent = make_job(settings, age_days=40), make_job(settings, age_days=1)
    with session_scope(settings) as session:
        for job_id, key in ((old, "monthly"), (recent, "daily")):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(idempotency_key=key, request_fingerprint="f" * 64)
            )
    with session_scope(settings) as session:
        assert feedback.purge_unlabeled_inputs(session=session, retention_days=30).jobs == 1
    with session_scope(settings) as session:
        keys = dict(session.execute(select(Job.id, Job.idempotency_key)).tuples().all())
        prints = dict(session.execute(select(Job.id, Job.request_fingerprint)).tuples().all())
    assert (keys[old], prints[old]) == (None, None)
    assert (keys[recent], prints[recent]) == ("daily", "f" * 64)
