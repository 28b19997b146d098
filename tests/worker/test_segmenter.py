"""The Segmenter in-process on real Postgres: one forward pass per batch, per-job outcomes."""

from __future__ import annotations

import uuid

import pytest

from segsvc.db import session_scope
from segsvc.images import validate_image
from segsvc.ml.preprocess import decode_mask_png
from segsvc.models import Job, JobStatus
from segsvc.services import jobs as job_service
from segsvc.settings import Settings
from tests.conftest import sample_images
from worker.segmenter import Segmenter

pytestmark = pytest.mark.timeout(180)


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
    assert counts == {"claimed": 4, "succeeded": 4, "failed": 0}
    for job in rows(settings, ids):
        assert job.status == JobStatus.SUCCEEDED
        assert job.batch_size == 4
        mask = decode_mask_png(job.mask_png or b"")
        assert mask.shape == (job.input_height, job.input_width)
        assert set(mask.ravel().tolist()) <= {0, 1, 2}


def test_segmenter_failing_image_fails_only_its_job(
    settings: Settings, segmenter: Segmenter
) -> None:
    ids = make_jobs(settings, 3, broken=1)
    counts = segmenter.run_jobs([str(i) for i in ids])
    assert counts == {"claimed": 3, "succeeded": 2, "failed": 1}
    bad, *good = rows(settings, ids)
    assert bad.status == JobStatus.FAILED
    assert bad.error_code == "poison_input"
    assert all(j.status == JobStatus.SUCCEEDED and j.batch_size == 2 for j in good)


def test_segmenter_duplicates_and_finished_jobs_are_noops(
    settings: Settings, segmenter: Segmenter
) -> None:
    ids = make_jobs(settings, 2)
    segmenter.run_jobs([str(ids[0]), str(ids[0])])
    again = segmenter.run_jobs([str(ids[0]), str(ids[1]), "not-a-uuid"])
    assert again == {"claimed": 1, "succeeded": 1, "failed": 0}
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
