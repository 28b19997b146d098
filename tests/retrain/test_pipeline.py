"""The retraining run on tiny data: labels in, a gated candidate out, everything recorded."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps
from sqlalchemy import func, select

from retrain.dataset import encode_png
from retrain.pipeline import RetrainBusyError, gate, retrain_lock, run_retraining
from segsvc.blobs import BlobMissingError
from segsvc.db import session_scope
from segsvc.digest import file_sha256
from segsvc.models import Job, JobStatus, ModelStatus, TrainingRun
from segsvc.retrain_lock import RETRAIN_LOCK_KEY
from segsvc.services import registry, rollout
from segsvc.services.retention import Cleared
from segsvc.settings import Settings
from tests.retrain.test_dataset import COLOURS, make_dataset, make_mask
from tests.segsvc.test_rollout import add_jobs


def loop_settings(settings: Settings, tmp_path: Path, **extra: object) -> Settings:
    """Tiny Oxford-layout train and eval folders, 1 epoch, a gate every candidate passes."""
    values: dict[str, object] = {
        "train_data_dir": make_dataset(tmp_path / "train", n=6),
        "eval_data_dir": make_dataset(tmp_path / "eval", n=3, size=(96, 80)),
        "retrain_epochs": 1,
        "retrain_min_new_labels": 3,
        "gate_miou_tolerance": 1.0,
        "gate_latency_ratio": 100.0,
        "gate_min_eval_images": 3,
        "canary_share": 0.5,
        "canary_min_jobs": 2,
        "runtime": "keras",
        "registry_poll_seconds": 0,  # the test refreshes the worker's registry view itself
    }
    values.update(extra)
    return settings.model_copy(update=values)


def submit(client, auth, mask: np.ndarray) -> str:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(encode_png(COLOURS[mask])), "pet.png")},
    )
    assert resp.status_code == 202
    return str(resp.get_json()["id"])


def submit_labeled_jobs(client, auth, segmenter, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Submit n photos through the API, run them in-process, post a corrected mask for each."""
    masks = [make_mask(90, 70, seed=100 + i) for i in range(n)]
    ids = [submit(client, auth, mask) for mask in masks]
    assert segmenter.run_jobs(ids)["succeeded"] == n
    for job_id, mask in zip(ids, masks, strict=True):
        buf = io.BytesIO()
        Image.fromarray(mask, "L").save(buf, format="PNG")
        resp = client.post(
            f"/v1/jobs/{job_id}/feedback",
            headers=auth,
            content_type="multipart/form-data",
            data={"mask": (io.BytesIO(buf.getvalue()), "mask.png"), "rating": "bad"},
        )
        assert resp.status_code == 201, resp.get_json()
        assert resp.get_json()["model_version"] == "test-v1"
    return ids


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_feedback_loop_retrains_canaries_and_promotes(  # type: ignore[no-untyped-def]
    client, auth, admin_key: str, settings: Settings, production_model: str, tmp_path: Path
) -> None:
    from worker.segmenter import Segmenter

    cfg = loop_settings(settings, tmp_path)
    segmenter = Segmenter(cfg)
    submit_labeled_jobs(client, auth, segmenter, 3)

    result = run_retraining(cfg, trigger="manual", steps_per_epoch=1, batch_size=2, latency_runs=3)

    assert result.status == "completed", result
    assert result.candidate_status == ModelStatus.CANARY
    with session_scope(cfg) as session:
        run = session.get(TrainingRun, uuid.UUID(result.run_id))
        assert run is not None
        assert run.trigger == "manual"
        assert len(run.feedback_ids) == 3
        assert run.data_counts["labels"] == run.data_counts["new_labels"] == 3
        assert run.data_counts["feedback_samples"] == 3
        assert run.data_counts["eval_images"] == 3
        assert run.production_version == "test-v1"
        for metrics in (run.candidate_metrics, run.production_metrics):
            assert 0.0 <= metrics["mean_iou"] <= 1.0
            assert metrics["latency_ms_batch1"] > 0
        assert (run.duration_s or 0) > 0
        assert "snapshot: 3 labels (3 new)" in run.log
        version = registry.get_version(session=session, version=run.candidate_version or "")
        assert (version.status, version.traffic_share) == ("canary", 0.5)
        assert version.parent_version == "test-v1"
        assert version.metrics["evaluated_against"]["version"] == "test-v1"
        assert Path(version.path).is_file()
        assert Path(version.path).parent == cfg.var_dir / "models"

    listed = client.get("/v1/models", headers={"Authorization": f"Bearer {admin_key}"})
    body = listed.get_json()
    assert {v["version"]: v["status"] for v in body["versions"]}[version.version] == "canary"
    assert body["training_runs"][0]["candidate_mean_iou"] == run.candidate_metrics["mean_iou"]
    # What the numbers stand for, drawn: photo | truth | production | candidate.
    urls = {v["version"]: v["urls"]["comparison"] for v in body["versions"]}
    drawn = f"/v1/models/{version.version}/comparison.png"
    assert urls == {"test-v1": None, version.version: drawn}
    assert Path(version.path).with_suffix(".png").is_file()
    sheet = client.get(urls[version.version], headers={"Authorization": f"Bearer {admin_key}"})
    assert (sheet.status_code, sheet.mimetype) == (200, "image/png")
    shown = version.metrics["comparison_images"]
    assert 1 <= len(shown) <= 3
    with Image.open(io.BytesIO(sheet.data)) as img:
        assert img.size == (4 * 214, 24 + 160 * len(shown))
    none = client.get(
        "/v1/models/test-v1/comparison.png", headers={"Authorization": f"Bearer {admin_key}"}
    )
    assert (none.status_code, none.get_json()["error"]) == (404, "not_found")
    assert client.get(urls[version.version], headers=auth).status_code == 403

    again = run_retraining(cfg, trigger="manual")
    assert again.status == "skipped"
    assert "0 new labels" in again.reason
    with session_scope(cfg) as session:  # a run keeps the ids new to it, not every label
        skipped = session.get(TrainingRun, uuid.UUID(again.run_id))
        assert skipped is not None
        assert (skipped.feedback_ids, skipped.data_counts["labels"]) == ([], 3)
    runs = client.get("/v1/models", headers={"Authorization": f"Bearer {admin_key}"})
    assert [r["labels"] for r in runs.get_json()["training_runs"][:2]] == [3, 3]

    # The worker picks the canary up and serves its share; then the verdict promotes it.
    assert segmenter.models.refresh()
    ids = [submit(client, auth, make_mask(90, 70, seed=i)) for i in range(20)]
    assert segmenter.run_jobs(ids)["succeeded"] == 20
    with session_scope(cfg) as session:
        for job_id in ids:
            served = session.get(Job, uuid.UUID(job_id)).model_version  # type: ignore[union-attr]
            canary = rollout.routes_to_canary(job_id, 0.5)
            assert served == (version.version if canary else "test-v1")
        verdict = rollout.decide_canary(
            session=session, min_jobs=cfg.canary_min_jobs, latency_ratio=cfg.gate_latency_ratio
        )
    assert verdict is not None
    assert verdict.outcome == "promoted", verdict
    with session_scope(cfg) as session:
        assert registry.production_version(session=session).version == version.version  # type: ignore[union-attr]


def test_retraining_skips_with_a_reason_when_too_few_new_labels(  # type: ignore[no-untyped-def]
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=5)
    result = run_retraining(cfg)
    assert result.status == "skipped"
    assert result.reason == "0 new labels since the last run; 5 needed"
    with session_scope(cfg) as session:
        run = session.get(TrainingRun, uuid.UUID(result.run_id))
        assert run is not None
        assert (run.status, run.feedback_ids, run.trigger) == ("skipped", [], "schedule")
        assert run.completed_at is not None


def test_retraining_refuses_an_evaluation_folder_too_small_to_judge_before_training(  # type: ignore[no-untyped-def]
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    """Only an empty folder was refused: a gate on 1-5 images promoted noise."""
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0, gate_min_eval_images=4)
    started = time.monotonic()
    result = run_retraining(cfg)
    assert result.status == "failed"
    assert "3 usable image/trimap pairs" in result.reason
    assert "SEG_GATE_MIN_EVAL_IMAGES" in result.reason
    assert time.monotonic() - started < 20  # no training ran
    with session_scope(cfg) as session:
        assert len(registry.list_versions(session=session)) == 1


def test_the_check_before_training_counts_the_pairs_the_evaluation_uses(  # type: ignore[no-untyped-def]
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    """Image files were counted: a folder whose trimaps were missing or whose images were
    EXIF-rotated passed, trained for hours, and failed after evaluating."""
    from tests.retrain.test_dataset import write_pair

    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0, gate_min_eval_images=3)
    root = Path(cfg.eval_data_dir or "")
    (root / "annotations" / "trimaps" / "pet_2.png").unlink()
    write_pair(root, "turned", make_mask(96, 80, seed=4), fmt="jpeg")
    with Image.open(root / "images" / "turned.jpg") as img:
        exif = img.getexif()
        exif[0x0112] = 6  # rotated 90 degrees
        img.save(root / "images" / "turned.jpg", format="JPEG", exif=exif.tobytes())
    started = time.monotonic()
    result = run_retraining(cfg)
    assert result.status == "failed"
    assert "2 usable image/trimap pairs" in result.reason, result
    assert time.monotonic() - started < 20  # no training ran


def test_an_evaluation_or_training_folder_without_images_fails_clearly(  # type: ignore[no-untyped-def]
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    (tmp_path / "flat").mkdir()
    for folder in ("eval_data_dir", "train_data_dir"):
        cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0)
        cfg = cfg.model_copy(update={folder: tmp_path / "flat"})
        result = run_retraining(cfg)
        assert result.status == "failed"
        kind = "evaluation" if folder == "eval_data_dir" else "training"
        assert result.reason.startswith(f"{kind} folder: {tmp_path / 'flat'} has no images/")


def test_retraining_fails_cleanly_without_an_evaluation_folder(  # type: ignore[no-untyped-def]
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    cfg = loop_settings(
        settings, tmp_path, retrain_min_new_labels=0, eval_data_dir=tmp_path / "missing"
    )
    result = run_retraining(cfg)
    assert result.status == "failed"
    assert "evaluation folder not found" in result.reason
    unset = run_retraining(cfg.model_copy(update={"eval_data_dir": None}))  # the default
    assert unset.status == "failed"
    assert unset.reason.startswith("SEG_EVAL_DATA_DIR is not set: retraining needs")
    with session_scope(cfg) as session:
        assert session.get(TrainingRun, uuid.UUID(result.run_id)).status == "failed"  # type: ignore[union-attr]
        assert len(registry.list_versions(session=session)) == 1


def test_only_one_retraining_run_at_a_time(settings: Settings, production_model: str) -> None:
    with retrain_lock(settings) as first:
        assert first
        with retrain_lock(settings) as second:
            assert not second
        with pytest.raises(RetrainBusyError):
            run_retraining(settings)
    with session_scope(settings) as session:
        assert session.query(TrainingRun).count() == 0
    with retrain_lock(settings) as again:
        assert again  # released


def test_the_lock_knows_when_its_database_session_ended(settings: Settings) -> None:
    """The advisory lock lives as long as its connection: a Postgres restart or a dropped
    connection frees it mid-run, and leaving the lock's block then must not fail the run."""
    from sqlalchemy import text

    from segsvc.db import get_engine

    with retrain_lock(settings) as held:
        assert held.still_held()
        with get_engine(settings).connect() as other:
            other.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND objid = CAST(CAST(:k AS bigint) AS oid) AND pid <> pg_backend_pid()"
                ),
                {"k": RETRAIN_LOCK_KEY},
            )
            other.commit()
        assert not held.still_held()
    with retrain_lock(settings) as again:  # freed with its session
        assert again


def test_a_run_that_lost_its_lock_registers_nothing(  # type: ignore[no-untyped-def]
    settings: Settings, production_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run may hold the lock once this one lost it: registering here as well had the
    two reject each other's canaries."""
    from segsvc import retrain_lock as lock_module
    from segsvc.services.model_files import models_dir

    monkeypatch.setattr(lock_module.Held, "still_held", lambda self: False)
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0)
    result = run_retraining(cfg, steps_per_epoch=1)
    assert result.status == "failed"
    assert "lock was lost" in result.reason
    with session_scope(cfg) as session:
        assert len(registry.list_versions(session=session)) == 1
    own = f"ft-*-{uuid.UUID(result.run_id).hex[:6]}.keras"  # candidate_path's name
    assert not list(models_dir(cfg).glob(own))  # its file is gone too


def test_a_registration_whose_commit_answer_was_lost_keeps_its_file(  # type: ignore[no-untyped-def]
    settings: Settings, production_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit registering the candidate went through but its answer was lost: the run
    fails, and its model file, which the registry now names, is not deleted."""
    from contextlib import contextmanager

    from retrain import pipeline

    real_scope, real_register = pipeline.session_scope, pipeline.registry.register_version
    registered: list[str] = []

    def register(**kwargs: Any) -> Any:
        registered.append(kwargs["version"])
        return real_register(**kwargs)

    @contextmanager
    def lossy(cfg: Settings):  # type: ignore[no-untyped-def]
        before = len(registered)
        with real_scope(cfg) as session:
            yield session
        if len(registered) > before:  # committed; the answer is "lost"
            raise OSError("server closed the connection unexpectedly")

    monkeypatch.setattr(pipeline.registry, "register_version", register)
    monkeypatch.setattr(pipeline, "session_scope", lossy)
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0)
    result = run_retraining(cfg, steps_per_epoch=1)
    assert result.status == "failed"
    with session_scope(cfg) as session:
        row = registry.get_version(session=session, version=registered[0])
    assert Path(row.path).is_file()


def test_gate_checks_miou_tolerance_and_latency_ratio() -> None:
    prod = {"mean_iou": 0.80, "latency_ms_batch1": 10.0}
    assert (
        gate(
            candidate={"mean_iou": 0.80, "latency_ms_batch1": 12.0},
            production=prod,
            tolerance=0.0,
            latency_ratio=1.2,
        )
        == []
    )
    worse = gate(
        candidate={"mean_iou": 0.79, "latency_ms_batch1": 12.5},
        production=prod,
        tolerance=0.0,
        latency_ratio=1.2,
    )
    assert len(worse) == 2
    assert "mean IoU 0.7900 < production 0.8000" in worse[0]
    assert "latency" in worse[1]
    assert (
        gate(
            candidate={"mean_iou": 0.79, "latency_ms_batch1": 5.0},
            production=prod,
            tolerance=0.02,
            latency_ratio=1.2,
        )
        == []
    )
    assert gate(
        candidate={"mean_iou": float("nan"), "latency_ms_batch1": 5.0},
        production=prod,
        tolerance=0.02,
        latency_ratio=1.2,
    )


def test_labels_of_jobs_whose_input_was_purged_are_not_used(settings: Settings) -> None:
    from segsvc.services import feedback
    from tests.segsvc.test_feedback import good_mask, make_job

    job_id = make_job(settings)
    with session_scope(settings) as session:
        feedback.submit_feedback(
            session=session, job_id=job_id, client_id=None, mask_png=good_mask()
        )
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.input_bytes = None
    with session_scope(settings) as session:
        assert feedback.labeled_feedback_ids(session=session) == []


def test_beat_schedule_is_in_the_worker_celery_config() -> None:
    from retrain.tasks import CANARY_CHECK, MAINTENANCE_QUEUE, PURGE_INPUTS, parse_cron
    from segsvc.queue import RETRAIN
    from worker.celery_app import app
    from worker.celery_app import settings as worker_settings

    schedule = app.conf.beat_schedule
    tasks = {entry["task"]: entry for entry in schedule.values()}
    assert {RETRAIN, CANARY_CHECK, PURGE_INPUTS} <= set(tasks)
    for name in (RETRAIN, CANARY_CHECK, PURGE_INPUTS):
        assert tasks[name]["options"]["queue"] == MAINTENANCE_QUEUE
    app.loader.import_default_modules()
    assert {RETRAIN, CANARY_CHECK, PURGE_INPUTS} <= set(app.tasks)
    assert app.conf.timezone == "UTC"
    assert tasks[RETRAIN]["schedule"] == parse_cron(worker_settings.retrain_cron)  # 03:00 UTC


def test_beat_schedule_follows_the_retrain_cron_setting() -> None:
    from retrain.tasks import RETRAIN, beat_schedule, parse_cron

    cfg = Settings(retrain_cron="15 2 * * 1", _env_file=None)  # type: ignore[call-arg]
    cron = beat_schedule(cfg)["segsvc-retrain"]["schedule"]
    assert (cron.minute, cron.hour, cron.day_of_week) == ({15}, {2}, {1})
    assert beat_schedule(cfg)["segsvc-retrain"]["task"] == RETRAIN
    with pytest.raises(ValueError, match="5 fields"):
        parse_cron("every day")


def test_canary_check_and_purge_tasks_run_as_plain_functions(
    settings: Settings,
    production_model: str,
    model_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from retrain import tasks
    from segsvc.services import rollout

    monkeypatch.setattr(
        tasks, "get_settings", lambda: settings.model_copy(update={"canary_min_jobs": 0})
    )
    assert tasks.canary_check() is None  # no canary
    with session_scope(settings) as session:
        registry.register_version(session=session, version="cand", path=model_file)
        rollout.start_canary(session=session, version="cand", share=0.1)
    verdict = tasks.canary_check()
    assert verdict is not None
    assert verdict["outcome"] == "waiting"  # 0 jobs: not even a minimum of 0 judges on none
    add_jobs(settings, "cand", 1)
    verdict = tasks.canary_check()
    assert verdict is not None
    assert verdict["outcome"] == "promoted"
    assert tasks.purge_inputs() == 0


def test_purge_task_deletes_the_files_of_released_fs_inputs(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: with blob_store=fs, retention cleared the rows' pointers and left every
    # input file on disk for ever (the privacy promise of retention_days was not kept).
    from retrain import tasks
    from segsvc.blobs import blob_store
    from segsvc.images import validate_image
    from segsvc.services import feedback
    from segsvc.services.jobs import create_jobs
    from tests.segsvc.test_feedback import good_mask, photo_bytes

    cfg = settings.model_copy(update={"blob_store": "fs", "blob_dir": tmp_path / "blobs"})
    monkeypatch.setattr(tasks, "get_settings", lambda: cfg)
    store = blob_store(cfg)
    long_ago = datetime.now(UTC) - timedelta(days=cfg.retention_days + 1)
    ids = []
    with session_scope(cfg) as session:
        # unlabeled, labeled, recent, and an old one whose bytes a recent upload (its twin)
        # sent again: the twin shares its file.
        for seed in (0, 1, 2, 3, 3):
            image = validate_image(photo_bytes(seed=seed), max_bytes=10**7, max_pixels=10**8)
            job = create_jobs(session=session, client_id=None, images=[image], store=store)[0]
            job.status, job.created_at = JobStatus.SUCCEEDED, long_ago
            job.model_version, job.completed_at = "test-v1", long_ago
            job.mask_png = store.put(good_mask())  # the worker writes masks through the store
            ids.append(job.id)
    unlabeled, labeled, recent, shared, twin = ids
    with session_scope(cfg) as session:
        feedback.submit_feedback(
            session=session, job_id=labeled, client_id=None, mask_png=good_mask()
        )
        for job_id in (recent, twin):
            session.get(Job, job_id).created_at = datetime.now(UTC)  # type: ignore[union-attr]
    with session_scope(cfg) as session:
        inputs = {i: session.get(Job, i).input_bytes for i in ids}  # type: ignore[union-attr]
        mask = session.get(Job, unlabeled).mask_png  # type: ignore[union-attr]
    assert inputs[shared] == inputs[twin]
    for value in [*inputs.values(), mask]:
        os.utime(store.path_for(value[-64:].decode()), (1e9, 1e9))  # written long ago
    assert tasks.purge_inputs() == 2  # unlabeled and shared
    with pytest.raises(BlobMissingError):
        store.get(inputs[unlabeled])
    for kept in (labeled, recent, twin):
        assert store.get(inputs[kept]) is not None
    assert store.get(mask) == good_mask()  # results stay: only inputs expire
    assert tasks.purge_inputs() == 0  # nothing left to do, nothing more removed
    assert store.get(inputs[labeled]) is not None
    assert store.get(mask) == good_mask()


def test_purge_keeps_a_file_that_is_also_another_jobs_result_mask(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads and masks share the content-addressed folder: an old upload byte-identical to a
    recent job's result mask (a returned mask sent back as an image) names the mask's file.
    Purging that input deleted the file, and the other job's mask answered 410."""
    from retrain import tasks
    from segsvc.blobs import blob_store
    from segsvc.images import validate_image
    from segsvc.services.jobs import create_jobs
    from tests.segsvc.test_feedback import good_mask, photo_bytes

    cfg = settings.model_copy(update={"blob_store": "fs", "blob_dir": tmp_path / "blobs"})
    monkeypatch.setattr(tasks, "get_settings", lambda: cfg)
    store = blob_store(cfg)
    long_ago = datetime.now(UTC) - timedelta(days=cfg.retention_days + 1)
    with session_scope(cfg) as session:
        served, sent_back = create_jobs(
            session=session,
            client_id=None,
            images=[
                validate_image(data, max_bytes=10**7, max_pixels=10**8)
                for data in (photo_bytes(), good_mask())
            ],
            store=store,
        )
        served.status, served.model_version = JobStatus.SUCCEEDED, "test-v1"
        served.mask_png = store.put(good_mask())  # the worker writes masks through the store
        sent_back.status, sent_back.created_at = JobStatus.SUCCEEDED, long_ago
        mask, sent_back_input = served.mask_png, sent_back.input_bytes
    assert sent_back_input == mask  # one file
    os.utime(store.path_for(mask[-64:].decode()), (1e9, 1e9))  # written long ago
    assert tasks.purge_inputs() == 1
    assert store.get(mask) == good_mask()


def test_purge_task_commits_chunk_by_chunk(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass over a backlog was one transaction: it held every cleared row's lock until the
    end (a mask submit or a migration waited on them) and rescanned from the oldest row for
    each chunk. Each chunk now commits before the next starts, and starts where it ended."""
    from retrain import tasks
    from segsvc.services import feedback
    from tests.segsvc.test_feedback import make_job

    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(feedback, "PURGE_CHUNK", 2)
    old = [make_job(settings, age_days=40 - i / 100) for i in range(5)]  # oldest first
    real_chunk = feedback.purge_unlabeled_chunk
    seen: list[tuple[int, int]] = []  # (inputs already gone when a chunk starts, its size)

    def chunk(**kwargs: object) -> Cleared:
        with session_scope(settings) as session:  # another connection: sees commits only
            gone = session.scalar(
                select(func.count()).where(Job.id.in_(old), Job.input_bytes.is_(None))
            )
        result = real_chunk(**kwargs)  # type: ignore[arg-type]
        seen.append((int(gone or 0), result.jobs))
        return result

    monkeypatch.setattr(feedback, "purge_unlabeled_chunk", chunk)
    assert tasks.purge_inputs() == 5
    assert seen == [(0, 2), (2, 2), (4, 1)]


def test_a_full_blob_sweep_removes_orphans_only(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from segsvc.blobs import blob_store
    from segsvc.cli import main
    from tests.worker.test_reconciler import make_job

    cfg = settings.model_copy(update={"blob_store": "fs", "blob_dir": tmp_path / "blobs"})
    monkeypatch.setattr("segsvc.cli.get_settings", lambda: cfg)
    store = blob_store(cfg)
    kept, orphan = store.put(b"a job's mask"), store.put(b"an upload whose row never committed")
    make_job(cfg, mask_png=kept)
    for value in (kept, orphan):
        os.utime(store.path_for(value[-64:].decode()), (1e9, 1e9))
    result = CliRunner().invoke(main, ["blobs", "sweep", "--grace-hours", "1"])
    assert result.exit_code == 0, result.output
    assert "deleted 1 blob file" in result.output
    assert store.get(kept) == b"a job's mask"
    with pytest.raises(BlobMissingError):
        store.get(orphan)


def eval_metrics() -> dict[str, Any]:
    """What `_Run._evaluate` reports for one model, with made-up numbers."""
    return {
        "mean_iou": 0.5,
        "pixel_accuracy": 0.5,
        "per_class_iou": {},
        "latency_ms_batch1": 1.0,
        "images": 3,
        "original_resolution": {"mean_iou": 0.5, "pixel_accuracy": 0.5},
    }


def test_a_candidate_records_which_faster_runtimes_stay_faithful(
    settings: Settings, tmp_path: Path
) -> None:
    """With SEG_RUNTIME=auto a retrained model is measured like the shipped one, so it is served
    by LiteRT int8 too when that stays faithful (its version's metrics carry the list)."""
    from retrain.pipeline import _Run, _version_metrics
    from segsvc.retrain_lock import Held
    from tests.retrain.test_evaluate import colour_model

    cfg = settings.model_copy(update={"runtime": "auto", "artifact_cache_dir": tmp_path / "a"})
    run = _Run(cfg, "manual", steps=1, batch_size=2, runs=1, lock=Held(True, lambda: True))
    eval_dir = make_dataset(tmp_path / "eval", n=3)
    found = run._faithful_runtimes(str(colour_model(tmp_path / "m.keras")), eval_dir)
    assert set(found["runtime_agreement"]) == {"litert-int8"}
    assert found["faithful_runtimes"] == (
        ["litert-int8"] if found["runtime_agreement"]["litert-int8"]["faithful"] else []
    )
    # A check that fails leaves the candidate on exact ONNX Runtime instead of failing the run.
    assert run._faithful_runtimes(str(tmp_path / "missing.keras"), eval_dir) == {
        "faithful_runtimes": []
    }

    base = eval_metrics()
    metrics = _version_metrics(base | found, base, {"version": "test-v1"}, uuid.uuid4())
    assert metrics["faithful_runtimes"] == found["faithful_runtimes"]
    assert metrics["runtime_agreement"] == found["runtime_agreement"]
    assert "faithful_runtimes" not in _version_metrics(base, base, {"version": "v"}, uuid.uuid4())


def quick_run(monkeypatch: pytest.MonkeyPatch, model_file: Path, during_eval: Any = None) -> None:
    """Retraining without the training: the candidate is a copy of `model_file` and both
    models score alike, so what is tested is what happens around the registration."""
    import shutil
    from types import SimpleNamespace

    from retrain.pipeline import _Run

    def fine_tune(self: _Run, samples: list[Any], init_model: str, out: Path) -> Any:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file, out)
        return SimpleNamespace(data={"used": 0})

    def evaluate(self: _Run, candidate: str, production: str) -> tuple[dict[str, Any], ...]:
        if during_eval is not None:
            during_eval()
        return eval_metrics(), eval_metrics()

    monkeypatch.setattr(_Run, "_fine_tune", fine_tune)
    monkeypatch.setattr(_Run, "_evaluate", evaluate)


def scored_runs(
    monkeypatch: pytest.MonkeyPatch, model_file: Path, scores: list[tuple[float, float]]
) -> None:
    """`quick_run`, each run's evaluation giving the next (candidate, production) mIoU."""
    from retrain.pipeline import _Run

    left = iter(scores)

    def evaluate(self: _Run, candidate: str, production: Any) -> tuple[dict[str, Any], ...]:
        cand, prod = next(left)
        return eval_metrics() | {"mean_iou": cand}, eval_metrics() | {"mean_iou": prod}

    quick_run(monkeypatch, model_file)
    monkeypatch.setattr(_Run, "_evaluate", evaluate)


def counting_fine_tune(monkeypatch: pytest.MonkeyPatch, model_file: Path) -> list[Any]:
    """`quick_run`, with the samples each fine-tune was given collected in the list returned."""
    from retrain.pipeline import _Run

    quick_run(monkeypatch, model_file)
    fine_tune, given = _Run._fine_tune, []

    def keep(self: _Run, samples: Any, init_model: str, out: Path) -> Any:
        given.append(samples)
        return fine_tune(self, samples, init_model, out)

    monkeypatch.setattr(_Run, "_fine_tune", keep)
    return given


def run_counts(settings: Settings, run_id: str) -> dict[str, Any]:
    with session_scope(settings) as session:
        run = session.get(TrainingRun, uuid.UUID(run_id))
        assert run is not None
        return dict(run.data_counts)


def test_a_candidate_is_not_canaried_if_production_changed_while_it_trained(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0)

    def operator_promotes_another_version() -> None:
        with session_scope(cfg) as session:
            registry.register_version(session=session, version="hotfix", path=model_file)
            rollout.promote(session=session, version="hotfix")

    cfg = cfg.model_copy(update={"retrain_min_new_labels": 1})
    mask = make_mask(90, 70, seed=3)
    labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    quick_run(monkeypatch, model_file, during_eval=operator_promotes_another_version)
    result = run_retraining(cfg, trigger="manual")
    # Not a verdict on the labels: the run did not use them up (it ended `completed`, and the
    # next run found no new label to train on).
    assert result.status == "failed", result
    assert "its labels count as new for the next run" in result.reason
    assert result.candidate_status == ModelStatus.REJECTED
    with session_scope(cfg) as session:
        version = registry.get_version(session=session, version=result.candidate_version or "")
        assert version.status == ModelStatus.REJECTED
        assert "production changed from test-v1 to hotfix" in (version.reason or "")
        assert registry.production_version(session=session).version == "hotfix"  # type: ignore[union-attr]
    quick_run(monkeypatch, model_file)
    again = run_retraining(cfg, trigger="manual")
    assert again.status == "completed", again
    with session_scope(cfg) as session:
        run = session.get(TrainingRun, uuid.UUID(again.run_id))
        assert run is not None
        assert run.data_counts["new_labels"] == 1


def test_a_scheduled_run_waits_for_the_canarys_verdict(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each scheduled run's candidate superseded the canary still collecting its verdict: on
    low traffic no canary was ever promoted. A scheduled run now waits (skipped, its labels
    kept as new); an operator's run goes on and supersedes it."""
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=1)
    with session_scope(cfg) as session:
        registry.register_version(session=session, version="live", path=model_file)
        rollout.start_canary(session=session, version="live", share=0.1)
    mask = make_mask(90, 70, seed=3)
    labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    quick_run(monkeypatch, model_file)
    waited = run_retraining(cfg)  # trigger "schedule"
    assert waited.status == "skipped", waited
    assert waited.reason.startswith("canary live is still collecting its verdict")
    with session_scope(cfg) as session:
        assert registry.get_version(session=session, version="live").status == "canary"
    forced = run_retraining(cfg, trigger="manual")
    assert forced.status == "completed", forced
    assert forced.candidate_status == ModelStatus.CANARY
    with session_scope(cfg) as session:
        run = session.get(TrainingRun, uuid.UUID(forced.run_id))
        assert run is not None
        assert run.data_counts["new_labels"] == 1  # the wait used none up
        live = registry.get_version(session=session, version="live")
        assert (live.status, live.reason) == (
            "rejected",
            f"superseded by canary {forced.candidate_version}",
        )


def test_a_scheduled_run_waits_a_week_at_most_for_a_canary_starved_of_traffic(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A canary that low traffic keeps short of SEG_CANARY_MIN_JOBS may never get a verdict:
    once it is CANARY_WAIT old, a scheduled run trains and its candidate supersedes it."""
    from retrain.pipeline import CANARY_WAIT

    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=1)
    with session_scope(cfg) as session:
        registry.register_version(session=session, version="starved", path=model_file)
        live = rollout.start_canary(session=session, version="starved", share=0.1)
        live.promoted_at = datetime.now(UTC) - CANARY_WAIT - timedelta(hours=1)
    mask = make_mask(90, 70, seed=4)
    labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    quick_run(monkeypatch, model_file)
    result = run_retraining(cfg)  # trigger "schedule"
    assert result.status == "completed", result
    with session_scope(cfg) as session:
        assert registry.get_version(session=session, version="starved").status == "rejected"


def test_a_late_failure_keeps_the_registered_canarys_model_file(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run fails after its candidate was registered as a canary (say, a database blip
    while recording the run): workers load that file, so it must stay."""
    from retrain.pipeline import _Run

    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0)
    quick_run(monkeypatch, model_file)
    finish = _Run._finish

    def blip(self: _Run, status: str, *args: Any, **kwargs: Any) -> Any:
        if status == "completed":
            raise RuntimeError("database blip")
        return finish(self, status, *args, **kwargs)

    monkeypatch.setattr(_Run, "_finish", blip)
    result = run_retraining(cfg, trigger="manual")
    assert result.status == "failed"
    with session_scope(cfg) as session:
        (canary,) = [
            v for v in registry.list_versions(session=session) if v.status == ModelStatus.CANARY
        ]
        assert Path(canary.path).is_file()


def test_a_run_prunes_old_model_files_of_rejected_versions_and_crashed_runs_at_its_end(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.segsvc.services.test_model_files import add_version, candidate

    # Every candidate fails the latency gate (equal latencies, ratio 0.5): rejected at once.
    cfg = loop_settings(
        settings, tmp_path, retrain_min_new_labels=0, gate_latency_ratio=0.5, var_dir=tmp_path
    )
    crashed, old_rejected = candidate(cfg), candidate(cfg)
    add_version(cfg, "old-rejected", old_rejected, ModelStatus.REJECTED)
    quick_run(monkeypatch, model_file)
    result = run_retraining(cfg, trigger="manual")
    assert result.candidate_status == ModelStatus.REJECTED
    assert not crashed.exists()
    assert not old_rejected.exists()
    with session_scope(cfg) as session:
        new = registry.get_version(session=session, version=result.candidate_version or "")
        assert Path(new.path).is_file()  # rejected just now: an operator may look at it
        assert new.file_deleted_at is None
        assert registry.get_version(session=session, version="old-rejected").file_deleted_at
    assert model_file.is_file()


def labeled_job(settings: Settings, image: bytes, mask: np.ndarray) -> None:
    """A succeeded job of `image` with a corrected mask, made by the real services."""
    from segsvc.blobs import blob_store
    from segsvc.images import validate_image
    from segsvc.services import feedback
    from segsvc.services import jobs as job_service
    from tests.segsvc.webhooks.factories import finish_job, start_job

    checked = validate_image(image, max_bytes=10**7, max_pixels=10**7)
    with session_scope(settings) as session:
        job_id = job_service.create_job(
            session=session, image=checked, store=blob_store(settings)
        ).id
    finish_job(settings, start_job(settings, job_id))
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG")
    with session_scope(settings) as session:
        feedback.submit_feedback(
            session=session, job_id=job_id, client_id=None, mask_png=buf.getvalue()
        )


def test_retraining_refuses_an_evaluation_folder_inside_the_training_one(  # type: ignore[no-untyped-def]
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    train = make_dataset(tmp_path / "train", n=4)
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0, eval_data_dir=train)
    result = run_retraining(cfg)
    assert result.status == "failed"
    assert "evaluation images would be trained on" in result.reason
    assert "same or nested" in result.reason


def test_labels_of_evaluation_images_are_left_out_of_training(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client may upload an evaluation image (public datasets are public) and label it:
    trained on, it would flatter the candidate at the gate."""
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=2)
    held_out = Path(cfg.eval_data_dir or "") / "images" / "pet_0.png"
    labeled_job(cfg, held_out.read_bytes(), make_mask(96, 80, seed=0))
    labeled_job(cfg, encode_png(COLOURS[make_mask(90, 70, seed=7)]), make_mask(90, 70, seed=7))
    given = counting_fine_tune(monkeypatch, model_file)
    result = run_retraining(cfg, trigger="manual")
    assert result.status == "completed", result
    assert [len(samples) for samples in given] == [1]
    counts = run_counts(cfg, result.run_id)
    assert counts["labels"] == 2
    assert counts["feedback_samples"] == 1
    assert counts["feedback_in_eval_set"] == 1


def test_labels_reach_training_decoded_to_model_size_in_chunks(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every label ever given was loaded in one statement and kept at full size (uploads up to
    10 MB, masks decoded at full resolution) through training: they are now read a chunk of
    ids at a time and each pair is kept only as its 128x128 arrays."""
    from retrain.dataset import Decoded
    from segsvc.services import feedback

    monkeypatch.setattr(feedback, "LOAD_CHUNK", 2)
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=3)
    for seed in range(3):
        mask = make_mask(300, 200, seed=seed)
        labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    seen = counting_fine_tune(monkeypatch, model_file)
    loads: list[int] = []
    real_iter = feedback.iter_labeled_inputs

    def counted(**kwargs: Any) -> Any:
        for label in real_iter(**kwargs):
            loads.append(1)
            yield label

    monkeypatch.setattr(feedback, "iter_labeled_inputs", counted)
    result = run_retraining(cfg, trigger="manual")
    assert result.status == "completed", result
    (samples,) = seen
    assert isinstance(samples, Decoded)
    assert samples.images.shape == (3, 128, 128, 3)
    assert samples.masks.shape == (3, 128, 128)
    assert set(np.unique(samples.masks)) <= {0, 1, 2}
    assert len(loads) == 3
    counts = run_counts(cfg, result.run_id)
    assert counts["feedback_samples"] == 3
    assert counts["feedback_input_missing"] == 0
    assert counts["feedback_gone"] == 0


def test_training_takes_decoded_labels_beside_the_folder(tmp_path: Path) -> None:
    from retrain.dataset import decode_samples, read_folder
    from retrain.train import train

    data = make_dataset(tmp_path / "data", n=4)
    mask = make_mask(90, 70, seed=3)
    extra = decode_samples([(encode_png(COLOURS[mask]), mask)] * 2, prefix="feedback")
    report = train(
        data_dir=data,
        epochs=1,
        out=tmp_path / "m.keras",
        batch_size=2,
        extra_samples=extra,
        progress=False,
        steps_per_epoch=1,
        evaluate_after=False,
    )
    assert report.args["extra_samples"] == 2
    assert report.data["train_used"] == len(read_folder(data, "train")) + 2


def test_a_runs_log_keeps_its_own_threads_lines_and_the_services_warnings(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The log was every `retrain.*` line of the process (the maintenance worker's other thread
    logs canary verdicts and purges meanwhile) and missed the warnings of the services a run
    calls: a label left out for its missing input file, a conversion that failed."""
    import logging
    import threading

    from segsvc.blobs import blob_store

    cfg = loop_settings(
        settings,
        tmp_path,
        retrain_min_new_labels=2,
        blob_store="fs",
        blob_dir=tmp_path / "blobs",
    )
    for seed in (1, 2):
        mask = make_mask(90, 70, seed=seed)
        labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    with session_scope(cfg) as session:
        pointer = session.scalars(select(Job.input_bytes).order_by(Job.created_at)).first()
    blob_store(cfg).path_for(bytes(pointer or b"")[-64:].decode()).unlink()

    def meanwhile() -> None:
        logging.getLogger("segsvc.ml.convert").warning("conversion of the candidate failed")
        other = threading.Thread(
            target=lambda: logging.getLogger("retrain.tasks").info("canary v9 promoted")
        )
        other.start()
        other.join()

    quick_run(monkeypatch, model_file, during_eval=meanwhile)
    result = run_retraining(cfg, trigger="manual")
    assert result.status == "completed", result
    with session_scope(cfg) as session:
        run = session.get(TrainingRun, uuid.UUID(result.run_id))
        assert run is not None
        assert "its input file is missing or damaged; left out" in run.log
        assert "conversion of the candidate failed" in run.log
        assert "canary v9 promoted" not in run.log
        assert run.data_counts["feedback_input_missing"] == 1
        assert run.data_counts["feedback_samples"] == 1


def test_the_gate_times_each_model_on_the_runtime_it_is_served_with(
    settings: Settings, model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With SEG_RUNTIME=auto both models were timed on ONNX Runtime float32, though production
    is served on LiteRT int8 when its metrics list it faithful, and the candidate's own
    faithfulness was measured only after: the gate compared runtimes nobody serves."""
    from types import SimpleNamespace

    from retrain.pipeline import _Run
    from segsvc.ml import runtime
    from segsvc.ml.runtime import converter_fingerprint
    from segsvc.retrain_lock import Held
    from tests.retrain.test_evaluate import colour_model

    monkeypatch.setattr(runtime, "gpu_visible", lambda: False)
    cfg = settings.model_copy(
        update={
            "runtime": "auto",
            "eval_data_dir": make_dataset(tmp_path / "eval", n=3),
            "gate_min_eval_images": 3,
        }
    )
    steps: list[str] = []
    loaded: dict[str, str] = {}

    def load(path: Any, *, kind: str, faithful: Any = (), **kwargs: Any) -> Any:
        steps.append("timed")
        loaded[str(path)] = runtime.resolve_kind(kind, faithful)
        return SimpleNamespace(name=loaded[str(path)], predict=lambda x: x)

    def measured(self: _Run, candidate: str, eval_dir: Path) -> dict[str, Any]:
        steps.append("faithfulness")
        return {"faithful_runtimes": [], "runtime_agreement": {}}

    monkeypatch.setattr(runtime, "load_runtime", load)
    monkeypatch.setattr(_Run, "_faithful_runtimes", measured)
    run = _Run(cfg, "manual", steps=1, batch_size=2, runs=1, lock=Held(True, lambda: True))
    candidate = str(colour_model(tmp_path / "candidate.keras"))
    agreement = {"litert-int8": {"converter": converter_fingerprint("litert-int8")}}
    production = {
        "version": "test-v1",
        "path": str(model_file),
        "sha256": file_sha256(model_file),
        "metrics": {"faithful_runtimes": ["litert-int8"], "runtime_agreement": agreement},
    }
    cand, prod = run._evaluate(candidate, production)
    assert steps == ["faithfulness", "timed", "timed"]
    assert loaded == {candidate: "onnx", str(model_file): "litert-int8"}
    assert (cand["runtime"], prod["runtime"]) == ("onnx", "litert-int8")
    cand["latency_ms_batch1"], prod["latency_ms_batch1"] = 12.0, 5.0
    (problem,) = gate(candidate=cand, production=prod, tolerance=1.0, latency_ratio=1.2)
    assert problem == "batch-1 latency 12.0 ms (onnx) > 1.2 x 5.0 ms (litert-int8)"


def label_a_copy_of_an_evaluation_photo(
    settings: Settings,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    copy: Callable[[Image.Image, np.ndarray], tuple[bytes, np.ndarray]],
) -> tuple[Any, list[Any], dict[str, Any]]:
    """A run whose labels are another photo's and `copy`'s (an upload made from the first of
    three sample photos in the evaluation folder, and its mask, from that photo and its
    trimap): its result, the samples each fine-tune was given, and its data counts."""
    from retrain.dataset import read_trimap
    from tests.conftest import SAMPLE_DIR

    stems = ["Abyssinian_1", "Abyssinian_10", "Abyssinian_100"]
    eval_dir = tmp_path / "pets"
    (eval_dir / "images").mkdir(parents=True)
    (eval_dir / "annotations" / "trimaps").mkdir(parents=True)
    for stem in stems:
        photo = SAMPLE_DIR / "images" / f"{stem}.jpg"
        if not photo.exists():
            pytest.skip("the Oxford pets sample is not available")
        (eval_dir / "images" / photo.name).write_bytes(photo.read_bytes())
        trimap = SAMPLE_DIR / "annotations" / "trimaps" / f"{stem}.png"
        (eval_dir / "annotations" / "trimaps" / trimap.name).write_bytes(trimap.read_bytes())
    cfg = loop_settings(
        settings, tmp_path, eval_data_dir=eval_dir, train_data_dir=None, retrain_min_new_labels=2
    )
    trimap = read_trimap(eval_dir / "annotations" / "trimaps" / f"{stems[0]}.png")
    with Image.open(eval_dir / "images" / f"{stems[0]}.jpg") as img:
        upload, mask = copy(img.convert("RGB"), trimap)
    labeled_job(cfg, upload, mask)
    other = make_mask(90, 70, seed=7)
    labeled_job(cfg, encode_png(COLOURS[other]), other)
    given = counting_fine_tune(monkeypatch, model_file)
    result = run_retraining(cfg, trigger="manual")
    return result, given, run_counts(cfg, result.run_id)


def test_a_label_of_a_resized_evaluation_photo_is_left_out_of_training(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An app that shrinks photos before upload sends other bytes of an evaluation photo: its
    label was trained on (only identical bytes were left out), so the gate scored the
    candidate on a picture it had seen; the training folder's check refused such copies."""

    def shrunk(photo: Image.Image, trimap: np.ndarray) -> tuple[bytes, np.ndarray]:
        small = photo.resize((photo.width // 2, photo.height // 2))
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=85)
        return buf.getvalue(), np.asarray(Image.fromarray(trimap).resize(small.size))

    result, given, counts = label_a_copy_of_an_evaluation_photo(
        settings, model_file, tmp_path, monkeypatch, shrunk
    )
    assert result.status == "completed", result
    assert [len(samples) for samples in given] == [1]
    assert (counts["feedback_samples"], counts["feedback_in_eval_set"]) == (1, 1)


def test_a_label_of_a_mirrored_evaluation_photo_is_left_out_of_training(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A selfie camera or an editor's flip mirrors an evaluation photo: its difference hash
    is far from the original's, and training's augmentation flips half the pictures, so its
    label was trained on while the gate scored the candidate on the same picture."""

    def mirrored(photo: Image.Image, trimap: np.ndarray) -> tuple[bytes, np.ndarray]:
        buf = io.BytesIO()
        ImageOps.mirror(photo).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), np.ascontiguousarray(trimap[:, ::-1])

    result, given, counts = label_a_copy_of_an_evaluation_photo(
        settings, model_file, tmp_path, monkeypatch, mirrored
    )
    assert result.status == "completed", result
    assert [len(samples) for samples in given] == [1]
    assert (counts["feedback_samples"], counts["feedback_in_eval_set"]) == (1, 1), counts


def test_the_best_before_is_not_carried_across_corrected_trimaps(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The evaluation set's identity hashed its image files alone: once an annotator corrected
    the trimaps, candidates were held to a best mIoU measured against the old ground truth,
    which no candidate (nor production) could reach on the new one: every run was rejected."""
    # (candidate, production) mIoU per run; the second on the corrected trimaps
    scored_runs(monkeypatch, model_file, [(0.82, 0.80), (0.70, 0.68)])
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=1, gate_miou_tolerance=0.0)
    mask = make_mask(90, 70, seed=0)
    labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    first = run_retraining(cfg, trigger="manual")
    assert first.candidate_status == "canary", first
    with session_scope(cfg) as session:
        rollout.promote(session=session, version=first.candidate_version or "", reason="test")
    trimaps = Path(cfg.eval_data_dir or "") / "annotations" / "trimaps"
    for path in trimaps.iterdir():  # the photos stay as they are
        fixed = np.asarray(Image.open(path)).copy()
        fixed[: fixed.shape[0] // 4] = 3  # a border along the top
        Image.fromarray(fixed, "L").save(path)
    mask = make_mask(90, 70, seed=1)
    labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    second = run_retraining(cfg, trigger="manual")
    assert second.candidate_status == "canary", second.reason  # 0.70 > production's 0.68


def test_a_running_run_shows_its_progress(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    client,  # type: ignore[no-untyped-def]
    admin_key: str,
) -> None:
    """A run's log reached its row only when the run ended: for the hours it trained, `GET
    /v1/models` showed `running` and nothing else."""
    import threading

    from retrain import pipeline
    from retrain.pipeline import _Run

    monkeypatch.setattr(pipeline, "PROGRESS_FLUSH_S", 0.05)
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=1)
    mask = make_mask(90, 70, seed=0)
    labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    quick_run(monkeypatch, model_file)
    inner = _Run._fine_tune
    in_training, release = threading.Event(), threading.Event()

    def slow(self: _Run, samples: Any, init_model: str, out: Path) -> Any:
        pipeline.log.info("epoch 1/3 (600 s): loss 0.5000")
        in_training.set()
        release.wait(30)
        return inner(self, samples, init_model, out)

    monkeypatch.setattr(_Run, "_fine_tune", slow)
    result: list[Any] = []
    run = threading.Thread(target=lambda: result.append(run_retraining(cfg, trigger="manual")))
    run.start()

    def runs() -> list[dict[str, Any]]:
        got = client.get("/v1/models", headers={"Authorization": f"Bearer {admin_key}"})
        listed: list[dict[str, Any]] = got.get_json()["training_runs"]
        return listed

    try:
        assert in_training.wait(30)
        deadline = time.monotonic() + 10
        while not any("epoch 1/3" in line for line in runs()[0]["log_tail"]):
            assert time.monotonic() < deadline, runs()
            time.sleep(0.05)
        assert runs()[0]["status"] == "running"
    finally:
        release.set()
        run.join(60)
    assert result[0].status == "completed", result
    final = runs()[0]
    assert final["status"] == "completed"
    assert any("completed: candidate" in line for line in final["log_tail"]), final


def test_a_run_trains_on_the_newest_labels_up_to_its_cap(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Labelled inputs are kept for ever and a run held every label ever given: each run
    needed more memory than the last. SEG_RETRAIN_MAX_LABELS bounds it to the newest."""
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=2, retrain_max_labels=2)
    for label in range(3):  # oldest first; each label's mask all one class: 0, 1, then 2
        mask = np.full((70, 90), label, np.uint8)
        labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    given = counting_fine_tune(monkeypatch, model_file)
    result = run_retraining(cfg, trigger="manual")
    assert result.status == "completed", result
    (samples,) = given
    assert len(samples) == 2
    assert sorted(np.unique(m).tolist() for m in samples.masks) == [[1], [2]]
    counts = run_counts(cfg, result.run_id)
    assert (counts["labels"], counts["over_cap"]) == (2, 1)


def test_runs_are_stamped_on_the_databases_clock(
    settings: Settings, production_model: str, tmp_path: Path, skew_clock: Any
) -> None:
    """Which labels are used comes from the newest trained run by `started_at`: a run started
    on a host whose clock is a day behind was not the newest, so its labels counted as new."""
    from tests.conftest import db_clock

    skew_clock(timedelta(days=-1))
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=50)
    before = db_clock(cfg)
    result = run_retraining(cfg, trigger="manual")
    assert result.status == "skipped"
    with session_scope(cfg) as session:
        run = session.get(TrainingRun, uuid.UUID(result.run_id))
        assert run is not None
        assert run.started_at is not None
        assert run.completed_at is not None
        assert before <= run.started_at <= run.completed_at <= db_clock(cfg)


def test_a_failed_fine_tune_leaves_no_checkpoint_folder(
    settings: Settings, production_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's checkpoint folder (var_dir/retrain/<run>, tens of MB) was removed only after
    a training that succeeded: each failed run left one on the models volume."""
    import retrain.train

    def fail(*, checkpoint: Path, **kwargs: Any) -> Any:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"weights so far")
        raise MemoryError("out of memory in epoch 2")

    monkeypatch.setattr(retrain.train, "train", fail)
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=1)
    mask = make_mask(90, 70, seed=3)
    labeled_job(cfg, encode_png(COLOURS[mask]), mask)
    result = run_retraining(cfg, trigger="manual")
    assert result.status == "failed"
    assert "MemoryError" in result.reason
    assert not (cfg.var_dir / "retrain" / result.run_id).exists()


def test_a_tolerance_is_not_lost_again_at_every_promotion(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each candidate was compared with the version it replaces alone: with a tolerance of
    0.01, promotion after promotion took the mIoU from 0.80 down by 0.01 each, unchecked. A
    candidate is now held to the best production of its line on the same evaluation set."""
    scored_runs(monkeypatch, model_file, [(0.79, 0.80), (0.78, 0.79)])  # (candidate, production)
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=1, gate_miou_tolerance=0.01)
    results = []
    for seed in range(2):
        mask = make_mask(90, 70, seed=seed)
        labeled_job(cfg, encode_png(COLOURS[mask]), mask)
        result = run_retraining(cfg, trigger="manual")
        results.append(result)
        if result.candidate_status == "canary":
            assert result.candidate_version is not None
            with session_scope(cfg) as session:
                rollout.promote(session=session, version=result.candidate_version, reason="test")
    first, second = results
    assert first.candidate_status == "canary", first  # 0.79 >= 0.80 - 0.01
    assert second.candidate_status == "rejected", second  # 0.78 >= 0.79 - 0.01; < 0.80 - 0.01
    assert "the best production before, 0.8000" in second.reason
    assert gate(  # the gate alone: the same numbers
        candidate={"mean_iou": 0.78, "latency_ms_batch1": 1.0},
        production={"mean_iou": 0.79, "latency_ms_batch1": 1.0},
        tolerance=0.01,
        latency_ratio=1.2,
        lineage_best=0.80,
    )


def test_a_run_fails_before_training_when_productions_file_was_replaced(
    settings: Settings, model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `git pull` of a new baseline (or `segsvc train --out` over it) changed the bytes under
    the registered version: the candidate would be fine-tuned from, and gated against, weights
    that never served."""
    import retrain.train

    def refuse(**kwargs: Any) -> Any:
        raise AssertionError("trained from a file that is not production's")

    monkeypatch.setattr(retrain.train, "train", refuse)
    path = tmp_path / "baseline.keras"
    path.write_bytes(model_file.read_bytes())
    with session_scope(settings) as session:
        registry.register_version(
            session=session, version="base", path=path, status=ModelStatus.PRODUCTION
        )
    path.write_bytes(model_file.read_bytes() + b"other bytes")
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=0)
    result = run_retraining(cfg, steps_per_epoch=1)
    assert result.status == "failed"
    assert "ModelFileMismatchError: production base" in result.reason
    assert "replaced at its path" in result.reason


def test_labels_none_of_which_is_usable_end_a_labels_only_run_saying_why(
    settings: Settings, production_model: str, tmp_path: Path
) -> None:
    """Without a training folder, labels all left out (their photos are evaluation images)
    failed the run on an empty temporary folder ("no usable training pairs in /tmp/tmp..."),
    the reasons unrecorded, and every later run failed alike on the same labels."""
    cfg = loop_settings(settings, tmp_path, retrain_min_new_labels=2, train_data_dir=None)
    images = Path(cfg.eval_data_dir or "") / "images"
    for n in range(2):
        labeled_job(cfg, (images / f"pet_{n}.png").read_bytes(), make_mask(96, 80, seed=n))
    result = run_retraining(cfg, trigger="schedule")
    assert result.status == "completed", result
    assert result.candidate_version is None
    assert "none of the 2 labels is usable (2 in eval set)" in result.reason
    assert "/tmp" not in result.reason
    counts = run_counts(cfg, result.run_id)
    assert (counts["feedback_samples"], counts["feedback_in_eval_set"]) == (0, 2)
    again = run_retraining(cfg, trigger="schedule")
    assert again.status == "skipped"  # the labels count as used: it waits for new ones
    assert "0 new labels" in again.reason
