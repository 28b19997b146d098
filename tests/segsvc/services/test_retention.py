"""Row retention: ended jobs past SEG_JOB_RETENTION_DAYS go, with their webhook log; labels stay."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import case, func, select, update

from segsvc.blobs import pointer_to
from segsvc.db import session_scope
from segsvc.models import Feedback, Job, JobStatus, WebhookAttempt, WebhookMessage
from segsvc.services import feedback, retention
from segsvc.settings import Settings
from tests.segsvc.test_feedback import good_mask, make_job
from tests.segsvc.webhooks.factories import finish_job, start_job
from tests.segsvc.webhooks.factories import make_job as make_webhook_job


def age(settings: Settings, job_id: uuid.UUID, days: float, *, ended: bool = True) -> None:
    """Make the job `days` old: submitted then, and (`ended`) ended then too, its webhook
    messages made then; else it ended just now."""
    then = datetime.now(UTC) - timedelta(days=days)
    with session_scope(settings) as session:
        ended_at = case((Job.completed_at.is_(None), None), else_=then) if ended else None
        values = {"created_at": then, **({"completed_at": ended_at} if ended else {})}
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        if ended:
            session.execute(
                update(WebhookMessage)
                .where(WebhookMessage.job_id == job_id)
                .values(created_at=then)
            )


def remaining(settings: Settings, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    with session_scope(settings) as session:
        return set(session.scalars(select(Job.id).where(Job.id.in_(ids))))


def delete_all(settings: Settings, days: int) -> int:
    """The hourly task's pass over these settings, with a retention of `days`."""
    from retrain import tasks

    return tasks.expire_jobs(settings.model_copy(update={"job_retention_days": days}))


def test_old_ended_jobs_go_with_their_webhook_log_and_ratings(settings: Settings) -> None:
    hooked = make_webhook_job(settings, "https://hooks.example/x")
    finish_job(settings, start_job(settings, hooked))
    rated = make_job(settings)
    labeled = make_job(settings)
    failed = make_job(settings, status=JobStatus.FAILED)
    queued = make_job(settings, status=JobStatus.QUEUED)  # not ended: stays however old
    recent = make_job(settings)
    with session_scope(settings) as session:
        feedback.submit_feedback(session=session, job_id=rated, client_id=None, rating="bad")
        feedback.submit_feedback(
            session=session, job_id=labeled, client_id=None, mask_png=good_mask()
        )
        message_ids = list(
            session.scalars(select(WebhookMessage.id).where(WebhookMessage.job_id == hooked))
        )
        session.add(WebhookAttempt(message_id=message_ids[0], status_code=500, duration_ms=1.0))
    for job_id in (hooked, rated, labeled, failed, queued):
        age(settings, job_id, 100)
    ids = [hooked, rated, labeled, failed, queued, recent]

    assert delete_all(settings, 90) == 3
    assert remaining(settings, ids) == {labeled, queued, recent}
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(WebhookMessage)) == 0
        assert session.scalar(select(func.count()).select_from(WebhookAttempt)) == 0
        assert list(session.scalars(select(Feedback.job_id))) == [labeled]
    assert delete_all(settings, 90) == 0


def test_deletion_walks_chunk_after_chunk(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "DELETE_CHUNK", 2)
    old = [make_job(settings) for _ in range(5)]
    for i, job_id in enumerate(old):
        age(settings, job_id, 100 - i / 100)
    assert delete_all(settings, 90) == 5
    assert remaining(settings, old) == set()


@pytest.fixture
def cfg(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The hourly task's settings: the fs blob store, jobs kept 90 days."""
    from retrain import tasks

    fs = settings.model_copy(
        update={"blob_store": "fs", "blob_dir": tmp_path / "blobs", "job_retention_days": 90}
    )
    monkeypatch.setattr(tasks, "get_settings", lambda: fs)
    return fs


def test_the_task_deletes_the_files_no_kept_job_names(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from retrain import tasks
    from segsvc.blobs import BlobMissingError, blob_store
    from segsvc.images import validate_image
    from segsvc.services.jobs import create_jobs
    from tests.segsvc.test_feedback import photo_bytes

    store = blob_store(cfg)
    with session_scope(cfg) as session:
        old, kept = create_jobs(
            session=session,
            client_id=None,
            images=[
                validate_image(photo_bytes(seed=seed), max_bytes=10**7, max_pixels=10**8)
                for seed in (0, 1)
            ],
            store=store,
        )
        old.status = kept.status = JobStatus.SUCCEEDED
        old.mask_png = store.put(good_mask())  # the same mask bytes: one shared file
        kept.mask_png = store.put(good_mask())
        old_input, shared_mask = old.input_bytes, old.mask_png
        old_id, kept_id = old.id, kept.id
    age(cfg, old_id, 100)
    for value in (old_input, shared_mask):
        assert value is not None
        os.utime(store.path_for(value[-64:].decode()), (1e9, 1e9))  # written long ago

    assert tasks.delete_expired_jobs() == 1
    assert remaining(cfg, [old_id, kept_id]) == {kept_id}
    with pytest.raises(BlobMissingError):
        store.get(old_input)
    assert store.get(shared_mask) == good_mask()  # the kept job still names it

    monkeypatch.setattr(
        tasks, "get_settings", lambda: cfg.model_copy(update={"job_retention_days": 0})
    )
    age(cfg, kept_id, 100)
    assert tasks.delete_expired_jobs() == 0  # 0: kept for ever
    assert remaining(cfg, [kept_id]) == {kept_id}


def test_an_inline_mask_of_a_pointers_length_is_not_taken_for_a_file(settings: Settings) -> None:
    """With the db store a small image's mask PNG can be 83 bytes, a pointer's length: it was
    read as a pointer, the chunk failed after its DELETE, and every pass failed on it again."""
    job_id = make_job(settings)
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(mask_png=b"\x89PNG" + b"x" * 79))
    age(settings, job_id, 100)
    assert delete_all(settings, 90) == 1


def test_a_blob_folder_that_fails_does_not_stop_the_pass(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrain import tasks

    monkeypatch.setattr(retention, "DELETE_CHUNK", 1)

    class Failing:
        def delete(self, digests: object, *, older_than_s: float) -> int:
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tasks, "blob_store", lambda _cfg: Failing())
    old = [make_job(cfg) for _ in range(3)]
    with session_scope(cfg) as session:  # each names a file: the deletion is tried
        for i, job_id in enumerate(old):
            session.execute(
                update(Job).where(Job.id == job_id).values(mask_png=pointer_to(f"{i:064x}"))
            )
    for job_id in old:
        age(cfg, job_id, 100)
    assert tasks.delete_expired_jobs() == 3
    assert remaining(cfg, old) == set()


def while_its_deletion_waits_to_commit(
    settings: Settings, act: Callable[[], object], before_it_waits: threading.Event | None = None
) -> list[object]:
    """Run `act` in a thread while row retention has deleted the aged job but not committed
    yet: it must wait for the deletion (checked once `before_it_waits` is set, if given),
    then end. Its outcome: what it returned, or what it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(act())
        except Exception as exc:  # the outcome is what is checked
            outcome.append(exc)

    with session_scope(settings) as deleting:
        cutoff = feedback.purge_cutoff(session=deleting, retention_days=90)
        deleted = retention.delete_ended_jobs_chunk(
            session=deleting, status=JobStatus.SUCCEEDED, cutoff=cutoff
        )
        assert deleted.jobs == 1
        thread = threading.Thread(target=run)
        thread.start()
        if before_it_waits is not None:
            assert before_it_waits.wait(5)
        thread.join(0.5)
        assert outcome == []  # waiting for the deletion to commit
    thread.join(10)
    return outcome


def test_a_rating_for_a_job_being_deleted_is_a_404_not_a_500(settings: Settings) -> None:
    """A rating took no lock: its insert waited for the deletion and then failed its foreign
    key (an IntegrityError, a 500). It now waits on the job row and finds it gone."""
    from segsvc.errors import NotFoundError

    job_id = make_job(settings)
    age(settings, job_id, 100)

    def rate() -> object:
        with session_scope(settings) as session:
            feedback.submit_feedback(session=session, job_id=job_id, client_id=None, rating="good")
        return "stored"

    outcome = while_its_deletion_waits_to_commit(settings, rate)
    assert len(outcome) == 1
    assert isinstance(outcome[0], NotFoundError)


def test_a_cancel_of_a_job_being_deleted_is_a_404_not_a_500(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel read the job, then waited to lock it while the deletion committed: the lock's
    re-read found no row (SQLAlchemy's InvalidRequestError, a 500)."""
    from segsvc.errors import NotFoundError
    from segsvc.services import jobs as job_service

    job_id = make_job(settings)
    age(settings, job_id, 100)
    read = threading.Event()  # it read the row the deletion has not committed yet
    real_get_job = job_service.get_job

    def get_job_then_wait(**kwargs: object) -> Job:
        job = real_get_job(**kwargs)  # type: ignore[arg-type]
        read.set()
        return job

    def cancel() -> object:
        with session_scope(settings) as session:
            job_service.cancel_job(session=session, job_id=str(job_id), client_id=None)
        return "canceled"

    monkeypatch.setattr(job_service, "get_job", get_job_then_wait)
    outcome = while_its_deletion_waits_to_commit(settings, cancel, before_it_waits=read)
    assert len(outcome) == 1
    assert isinstance(outcome[0], NotFoundError)


def test_a_blob_folder_that_is_not_the_store_does_not_stop_the_pass(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with the volume away (`segsvc.blob_mark` refuses the folder), the pass
    raised after its first chunk's commit and the other chunks waited for the next hour."""
    from retrain import tasks
    from segsvc import blob_mark
    from segsvc.blobs import blob_store
    from tests.segsvc.test_blob_mark import unmount

    monkeypatch.setattr(retention, "DELETE_CHUNK", 1)
    blob_mark.forget()
    store = blob_store(cfg)
    old = [make_job(cfg) for _ in range(3)]
    with session_scope(cfg) as session:
        for i, job_id in enumerate(old):
            session.execute(
                update(Job).where(Job.id == job_id).values(mask_png=store.put(b"mask %d" % i))
            )
    for job_id in old:
        age(cfg, job_id, 100)
    assert cfg.blob_dir is not None
    unmount(cfg.blob_dir)
    assert tasks.delete_expired_jobs() == 3
    assert remaining(cfg, old) == set()
    assert list(cfg.blob_dir.iterdir()) == []  # nothing deleted there, nor written


def test_a_job_that_ended_recently_stays_however_long_ago_it_was_submitted(
    settings: Settings,
) -> None:
    """Deleted by its submit time alone, a job that waited in the queue for days went as it
    ended: its result, and its `job.completed` webhook, retried for days after the event."""
    hooked = make_webhook_job(settings, "https://hooks.example/x")
    age(settings, hooked, 100, ended=False)  # queued 100 days ago...
    finish_job(settings, start_job(settings, hooked))  # ...ended now, its webhook pending
    assert delete_all(settings, 90) == 0
    assert remaining(settings, [hooked]) == {hooked}
    age(settings, hooked, 100)  # ended, and its webhook made, 100 days ago too
    assert delete_all(settings, 90) == 1


def test_a_pending_webhook_still_retried_keeps_its_job(settings: Settings) -> None:
    """A client's redeliver of an old job's message retries it from then: the job stays until
    those retries end; a message left pending far longer (no webhook worker ran) keeps none."""
    hooked = make_webhook_job(settings, "https://hooks.example/x")
    finish_job(settings, start_job(settings, hooked))
    age(settings, hooked, 100)
    redelivered(settings, hooked, timedelta(hours=1))
    assert delete_all(settings, 90) == 0
    redelivered(settings, hooked, timedelta(days=30))
    assert delete_all(settings, 90) == 1


def redelivered(settings: Settings, job_id: uuid.UUID, ago: timedelta) -> None:
    """The job's webhook messages redelivered by its client `ago`."""
    with session_scope(settings) as session:
        session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.job_id == job_id)
            .values(redelivered_at=datetime.now(UTC) - ago)
        )
