"""The Segmenter in-process on real Postgres: one forward pass per batch, per-job outcomes."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from segsvc import notify
from segsvc.db import DbRole, get_engine, is_db_timeout, session_scope
from segsvc.images import validate_image
from segsvc.ml.preprocess import decode_mask_png
from segsvc.models import Job, JobStatus
from segsvc.services import jobs as job_service
from segsvc.settings import Settings
from tests.conftest import sample_images
from tests.segsvc.test_db import holding, limited
from worker import segmenter as segmenter_module
from worker.segmenter import Segmenter, _wait_for_locks

pytestmark = pytest.mark.timeout(180)

# A migration's ALTER TABLE queued behind a long admin transaction: every statement on `jobs`
# queues behind it, far past the test workers' lock timeout, until the test lets go of it.
LOCK_JOBS = "LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"
HOLD_S = 60.0  # a safety net: the holder lets go then, should the test not have let go before


def worker_settings(settings: Settings, **limits: float) -> Settings:
    """The settings of an inference worker (role `worker`), its lock timeout cut to 0.3 s."""
    return limited(
        settings, "worker", db_lock_timeout_seconds=0.3, registry_poll_seconds=0, **limits
    )


def make_jobs(settings: Settings, n: int, *, broken: int = 0) -> list[uuid.UUID]:
    """`n` queued jobs from real photos; the first `broken` have a malformed model input."""
    ids = []
    with session_scope(settings) as session:
        for i, photo in enumerate(sample_images(n)):
            image = validate_image(photo.read_bytes(), max_bytes=10**7, max_pixels=10**8)
            job = job_service.create_job(session=session, image=image)
            if i < broken:
                job.model_input = b"short"
            ids.append(job.id)
    return ids


def rows(settings: Settings, ids: list[uuid.UUID]) -> list[Job]:
    with session_scope(settings) as session:
        found = {j.id: j for j in session.query(Job).filter(Job.id.in_(ids))}
        for job in found.values():
            _ = job.mask_png  # load the deferred column before the session closes
        return [found[i] for i in ids]


@pytest.fixture
def segmenter(settings: Settings, production_model: str) -> Segmenter:
    return Segmenter(settings.model_copy(update={"registry_poll_seconds": 0}))


def test_segmenter_runs_a_batch_in_one_forward_pass(
    settings: Settings, segmenter: Segmenter
) -> None:
    ids = make_jobs(settings, 4)
    counts = segmenter.run_jobs([str(i) for i in ids])
    assert counts == {"claimed": 4, "succeeded": 4, "failed": 0, "canceled": 0}
    for job in rows(settings, ids):
        assert job.status == JobStatus.SUCCEEDED
        assert job.batch_size == 4
        mask = decode_mask_png(job.mask_png or b"")
        assert mask.shape == (job.input_height, job.input_width)
        assert set(mask.ravel().tolist()) <= {0, 1, 2}


def test_segmenter_notices_carry_the_end_states_it_stored(
    settings: Settings, segmenter: Segmenter
) -> None:
    """One notice per batch; a stored result's end state is what a read of the job gives, so a
    long poll can answer from it. A failed job's notice has none: its waiter reads the job."""
    url = settings.effective_redis_url
    pubsub = redis.Redis.from_url(url).pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(notify.channel(url))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    broken, *good = make_jobs(settings, 3, broken=1)
    segmenter.run_jobs([str(i) for i in [broken, *good]])
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert message is not None
    assert message["type"] == "message"
    notice = notify.parse_notice(message["data"])
    assert notice[str(broken)] is None
    for job in rows(settings, good):
        assert notice[str(job.id)] == job_service.end_state(
            {key: getattr(job, key) for key in job_service.END_STATE_COLUMNS}
        )
        assert notice[str(job.id)]["status"] == "succeeded"


def test_segmenter_failing_image_fails_only_its_job(
    settings: Settings, segmenter: Segmenter
) -> None:
    ids = make_jobs(settings, 3, broken=1)
    counts = segmenter.run_jobs([str(i) for i in ids])
    assert counts == {"claimed": 3, "succeeded": 2, "failed": 1, "canceled": 0}
    bad, *good = rows(settings, ids)
    assert bad.status == JobStatus.FAILED
    assert bad.error_code == "poison_input"
    assert all(j.status == JobStatus.SUCCEEDED and j.batch_size == 2 for j in good)


def test_a_claim_that_fails_after_its_commit_gives_its_jobs_back(
    settings: Settings, segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stacking the inputs ran out of memory after the claim committed: the jobs stayed leased
    to this worker until the lease ran out, each then counted a lost run."""

    def out_of_memory(pixels: Any) -> Any:
        raise MemoryError("stacking the batch")

    monkeypatch.setattr(segmenter_module, "normalize", out_of_memory)
    ids = make_jobs(settings, 2)
    with pytest.raises(MemoryError):
        segmenter.claim([str(i) for i in ids])
    for job in rows(settings, ids):
        assert (job.status, job.lease_token) == (JobStatus.QUEUED, None)


def test_segmenter_post_processing_failure_fails_its_job_with_the_version_that_ran_it(
    settings: Settings, segmenter: Segmenter, production_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model ran the job, so its failure carries the version: a canary's verdict counts it
    against the version that served it, not the arm its id hashes to. A malformed stored input
    never reached a model and carries none."""
    poisoned, failing, fine = make_jobs(settings, 3, broken=1)
    real_result = segmenter_module._result

    def result(job: Any, *args: Any) -> dict[str, Any]:
        if job.id == failing:
            raise ValueError("mask encoder broke")
        return real_result(job, *args)

    monkeypatch.setattr(segmenter_module, "_result", result)
    counts = segmenter.run_jobs([str(i) for i in (poisoned, failing, fine)])
    assert counts == {"claimed": 3, "succeeded": 1, "failed": 2, "canceled": 0}
    poison, broken, ok = rows(settings, [poisoned, failing, fine])
    assert (poison.error_code, poison.model_version) == ("poison_input", None)
    assert (broken.status, broken.error_code) == (JobStatus.FAILED, "postprocess_failed")
    assert "mask encoder broke" not in (broken.error_message or "")  # internals stay in the log
    assert broken.model_version == production_model
    assert (ok.status, ok.model_version) == (JobStatus.SUCCEEDED, production_model)


def test_segmenter_duplicates_and_finished_jobs_are_noops(
    settings: Settings, segmenter: Segmenter
) -> None:
    ids = make_jobs(settings, 2)
    segmenter.run_jobs([str(ids[0]), str(ids[0])])
    again = segmenter.run_jobs([str(ids[0]), str(ids[1]), "not-a-uuid"])
    assert again == {"claimed": 1, "succeeded": 1, "failed": 0, "canceled": 0}
    assert [j.attempts for j in rows(settings, ids)] == [1, 1]


def test_segmenter_store_is_fenced_by_the_lease(settings: Settings, segmenter: Segmenter) -> None:
    ids = make_jobs(settings, 2)
    inferred = segmenter.infer([str(i) for i in ids])
    with session_scope(settings) as session:  # another worker took job 0 over meanwhile
        session.get(Job, ids[0]).lease_token = uuid.uuid4()  # type: ignore[union-attr]
    counts = segmenter.store(inferred)
    assert counts["succeeded"] == 1
    first, second = rows(settings, ids)
    assert first.status == JobStatus.RUNNING
    assert first.mask_png is None
    assert second.status == JobStatus.SUCCEEDED


def test_segmenter_counts_a_job_canceled_while_running_as_canceled(
    settings: Settings, segmenter: Segmenter
) -> None:
    """A cancel between the claim and the store ends the job canceled, without its result: its
    count (and `segsvc_jobs_total`) says canceled, not succeeded."""
    ids = make_jobs(settings, 2)
    inferred = segmenter.infer([str(i) for i in ids])
    with session_scope(settings) as session:
        session.get(Job, ids[0]).cancel_requested = True  # type: ignore[union-attr]
    canceled_before = REGISTRY.get_sample_value("segsvc_jobs_total", {"status": "canceled"}) or 0
    counts = segmenter.store(inferred)
    assert (counts["succeeded"], counts["canceled"], counts["failed"]) == (1, 1, 0)
    assert [j.status for j in rows(settings, ids)] == [JobStatus.CANCELED, JobStatus.SUCCEEDED]
    after = REGISTRY.get_sample_value("segsvc_jobs_total", {"status": "canceled"})
    assert after == canceled_before + 1


def test_segmenter_counts_a_canceled_job_whose_post_processing_failed_as_canceled(
    settings: Settings, segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its failure ends it canceled (the client asked for that): counted canceled, not failed."""
    ids = make_jobs(settings, 2)
    inferred = segmenter.infer([str(i) for i in ids])
    with session_scope(settings) as session:
        session.get(Job, ids[0]).cancel_requested = True  # type: ignore[union-attr]
    real_result = segmenter_module._result

    def result(job: Any, *args: Any) -> dict[str, Any]:
        if job.id == ids[0]:
            raise ValueError("mask encoder broke")
        return real_result(job, *args)

    monkeypatch.setattr(segmenter_module, "_result", result)
    counts = segmenter.store(inferred)
    assert (counts["succeeded"], counts["failed"], counts["canceled"]) == (1, 0, 1)
    assert [j.status for j in rows(settings, ids)] == [JobStatus.CANCELED, JobStatus.SUCCEEDED]


def jobs_total(status: str) -> float:
    return REGISTRY.get_sample_value("segsvc_jobs_total", {"status": status}) or 0.0


def queue_waits() -> float:
    return REGISTRY.get_sample_value("segsvc_job_queue_wait_seconds_count") or 0.0


def test_a_failure_another_worker_took_over_is_not_counted_by_this_one(
    settings: Settings, segmenter: Segmenter
) -> None:
    """A stalled worker's failure of a job the reconciler had handed to another worker writes
    nothing (fenced by the lease), but it was counted failed: twice, with the other worker's."""
    bad, good = make_jobs(settings, 2, broken=1)
    inferred = segmenter.infer([str(bad), str(good)])
    with session_scope(settings) as session:  # the lease ran out; another worker has both
        for job_id in (bad, good):
            session.get(Job, job_id).lease_token = uuid.uuid4()  # type: ignore[union-attr]
    failed_before, waits_before = jobs_total("failed"), queue_waits()
    counts = segmenter.store(inferred)
    assert (counts["succeeded"], counts["failed"]) == (0, 0)
    assert jobs_total("failed") == failed_before
    assert queue_waits() == waits_before  # no result stored: no queue wait recorded either


def test_each_stored_result_records_its_queue_wait_once(
    settings: Settings, segmenter: Segmenter
) -> None:
    before = queue_waits()
    counts = segmenter.run_jobs([str(i) for i in make_jobs(settings, 2)])
    assert counts["succeeded"] == 2
    assert queue_waits() == before + 2


def test_a_job_a_release_ends_is_counted(settings: Settings, segmenter: Segmenter) -> None:
    """A job given back too often for too long ends failed (worker_error) on the release path,
    which counted nothing: a blob store or canary away for good never moved the failures."""
    from datetime import timedelta

    from segsvc.models import utcnow

    (job_id,) = make_jobs(settings, 1)
    claim = segmenter.claim([str(job_id)])
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.releases = job_service.MAX_RELEASES - 1
        job.first_released_at = utcnow() - timedelta(seconds=job_service.RELEASE_GIVE_UP_S + 1)
    failed_before = jobs_total("failed")
    segmenter.release(claim)
    (ended,) = rows(settings, [job_id])
    assert (ended.status, ended.error_code) == (JobStatus.FAILED, "worker_error")
    assert jobs_total("failed") == failed_before + 1


def test_segmenter_stores_masks_in_the_fs_blob_store(
    settings: Settings, production_model: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from segsvc.blobs import blob_store, is_pointer

    cfg = settings.model_copy(
        update={"registry_poll_seconds": 0, "blob_store": "fs", "blob_dir": tmp_path / "blobs"}
    )
    ids = make_jobs(cfg, 2)
    assert Segmenter(cfg).run_jobs([str(i) for i in ids])["succeeded"] == 2
    for job in rows(cfg, ids):
        assert is_pointer(job.mask_png)
        mask = decode_mask_png(blob_store(cfg).get(job.mask_png) or b"")
        assert mask.shape == (job.input_height, job.input_width)


def test_segmenter_release_waits_for_a_locked_jobs_table(
    settings: Settings, production_model: str
) -> None:
    # Regression: the release ran under the worker's lock timeout, so behind a migration's lock
    # it failed like the store before it; the jobs stayed running until their leases expired
    # and counted as lost runs, which quarantine a job as a poison input when repeated.
    segmenter = Segmenter(worker_settings(settings))
    ids = make_jobs(settings, 2)
    inferred = segmenter.infer([str(i) for i in ids])
    assert settings.database_url is not None
    with ThreadPoolExecutor(1) as pool:
        with holding(settings.database_url, LOCK_JOBS, seconds=HOLD_S):
            releasing = pool.submit(segmenter.release, inferred)
            wait([releasing], timeout=1.0)  # over three times the worker's lock timeout
            assert not releasing.done(), releasing.exception()
        releasing.result(timeout=30)  # the holder let go
    for job in rows(settings, ids):
        assert (job.status, job.lease_token) == (JobStatus.QUEUED, None)
        assert (job.attempts, job.releases) == (1, 1)  # no lost run


def test_segmenter_release_retries_after_losing_its_connection(
    settings: Settings, production_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    segmenter = Segmenter(worker_settings(settings))
    ids = make_jobs(settings, 2)
    claim = segmenter.claim([str(i) for i in ids])
    assert settings.database_url is not None
    with ThreadPoolExecutor(1) as pool:
        with holding(settings.database_url, LOCK_JOBS, seconds=HOLD_S):
            releasing = pool.submit(segmenter.release, claim)
            terminate_lock_waiter(settings)  # a failover, say, while the release waits
        releasing.result(timeout=30)  # tried again, it waited for the holder to let go
    assert "releasing a batch failed" in caplog.text
    for job in rows(settings, ids):
        assert (job.status, job.attempts, job.releases) == (JobStatus.QUEUED, 1, 1)


def test_segmenter_release_waits_for_a_lock_until_the_lease_ends(
    settings: Settings, production_model: str
) -> None:
    segmenter = Segmenter(worker_settings(settings, job_lease_seconds=2))
    ids = make_jobs(settings, 1)
    segmenter.load()
    leased = time.monotonic()
    claim = segmenter.claim([str(i) for i in ids])
    assert settings.database_url is not None
    with holding(settings.database_url, LOCK_JOBS, seconds=10):
        with pytest.raises(OperationalError) as caught:
            segmenter.release(claim)
        waited = time.monotonic() - leased
    assert is_db_timeout(caught.value)
    assert 1.5 < waited < 4  # then the lease is up: the reconciler takes the job
    (job,) = rows(settings, ids)
    assert (job.status, job.releases) == (JobStatus.RUNNING, 0)


@pytest.mark.parametrize(
    ("role", "lock", "statement"), [("worker", "0", "7s"), ("admin", "0", "0")]
)
def test_segmenter_waits_for_locks_only_in_place_of_a_role_s_limits(
    settings: Settings, role: DbRole, lock: str, statement: str
) -> None:
    # Admin work (role `admin`, no limits) must not gain a statement timeout from the release.
    cfg = limited(settings, role, db_lock_timeout_seconds=0.3)
    with session_scope(cfg) as session:
        _wait_for_locks(session, cfg, 7.0)
        assert session.scalar(text("SHOW lock_timeout")) == lock
        assert session.scalar(text("SHOW statement_timeout")) == statement


def terminate_lock_waiter(settings: Settings) -> None:
    """End the connection of the statement waiting for a lock on `jobs` (within 5 s)."""
    deadline = time.monotonic() + 5
    waiting = text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND query LIKE 'UPDATE jobs %'"
    )
    while time.monotonic() < deadline:
        with get_engine(settings).connect() as conn:
            if conn.execute(waiting).first() is not None:
                return
        time.sleep(0.05)
    raise AssertionError("no statement waited for the lock on jobs")
