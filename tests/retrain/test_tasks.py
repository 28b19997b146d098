"""The feedback loop's periodic tasks that retraining's own tests do not cover: the blob sweep,
and the run metrics the retrain task records."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from retrain import pipeline, tasks
from segsvc.blobs import blob_store
from segsvc.db import session_scope
from segsvc.images import validate_image
from segsvc.services.jobs import create_jobs
from segsvc.settings import Settings
from tests.segsvc.test_feedback import photo_bytes

LONG_AGO = (1e9, 1e9)  # 2001


@pytest.fixture
def cfg(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"blob_store": "fs", "blob_dir": tmp_path / "blobs"})


def test_the_daily_sweep_deletes_old_files_no_job_names(cfg: Settings) -> None:
    """A file whose request failed after it was written (a 409 for a concurrent idempotent
    twin, a 503, a lost commit) is named by no row, so retention never deletes it: the daily
    sweep does, once it is a day old. Files rows name, and new ones, stay."""
    from retrain import tasks

    store = blob_store(cfg)
    with session_scope(cfg) as session:
        (job,) = create_jobs(
            session=session,
            images=[validate_image(photo_bytes(seed=3), max_bytes=10**7, max_pixels=10**8)],
            store=store,
        )
        named = job.input_bytes
    assert named is not None
    orphan = store.put(b"the upload of a request that failed")
    fresh = store.put(b"an upload whose row is about to commit")
    paths = {
        name: store.path_for(v[-64:].decode())
        for name, v in (("named", named), ("orphan", orphan), ("fresh", fresh))
    }
    os.utime(paths["named"], LONG_AGO)
    os.utime(paths["orphan"], LONG_AGO)

    assert tasks.sweep_unnamed_blobs(cfg) == 1
    assert {name for name, path in paths.items() if path.exists()} == {"named", "fresh"}


def test_the_sweep_is_scheduled_daily_on_the_maintenance_queue(tmp_path: Path) -> None:
    from retrain.tasks import MAINTENANCE_QUEUE, SWEEP_BLOBS, beat_schedule, sweep_unnamed_blobs

    cfg = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    entry = next(e for e in beat_schedule(cfg).values() if e["task"] == SWEEP_BLOBS)
    assert entry["options"]["queue"] == MAINTENANCE_QUEUE
    assert (entry["schedule"].minute, entry["schedule"].hour) == ({7}, {5})
    assert sweep_unnamed_blobs(cfg) == 0  # no blob folder (the db store): nothing read


def test_a_sweep_keeps_at_least_an_hour_of_files(cfg: Settings) -> None:
    """With no grace, the file of an upload whose row had not committed yet was deleted (its
    job then failed with the blob missing)."""
    from click.testing import CliRunner

    from retrain import tasks
    from segsvc.cli import main

    with pytest.raises(ValueError, match="1 h"):
        tasks.sweep_unnamed_blobs(cfg, older_than_s=0)
    result = CliRunner().invoke(main, ["blobs", "sweep", "--grace-hours", "0"])
    assert result.exit_code == 2
    assert "--grace-hours" in result.output


def runs(result: str) -> float:
    return REGISTRY.get_sample_value("segsvc_retrain_runs_total", {"result": result}) or 0.0


def last_success() -> float:
    return REGISTRY.get_sample_value("segsvc_retrain_last_success_timestamp_seconds") or 0.0


@pytest.mark.parametrize(
    ("status", "succeeded"), [("completed", True), ("skipped", True), ("failed", False)]
)
def test_the_retrain_task_counts_each_run_by_result_and_stamps_successes(
    monkeypatch: pytest.MonkeyPatch, status: str, succeeded: bool
) -> None:
    """No series said whether the nightly runs worked: a pipeline failing every night (a
    missing evaluation folder, say) showed nowhere but in its rows."""
    result = pipeline.RunResult("run-1", status, "why")
    monkeypatch.setattr(pipeline, "run_retraining", lambda *a, **k: result)
    tasks.RETRAIN_LAST_SUCCESS.set(0)
    before = runs(status)
    assert tasks.retrain_task("manual")["status"] == status
    assert runs(status) == before + 1
    if succeeded:
        assert abs(last_success() - time.time()) < 60
    else:
        assert last_success() == 0


def test_the_retrain_task_counts_busy_and_raising_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(*_: object, **__: object) -> pipeline.RunResult:
        raise pipeline.RetrainBusyError("Another retraining run is in progress.")

    def broken(*_: object, **__: object) -> pipeline.RunResult:
        raise OSError("disk full")

    before = runs("busy"), runs("error")
    monkeypatch.setattr(pipeline, "run_retraining", busy)
    assert tasks.retrain_task("manual")["status"] == "busy"
    monkeypatch.setattr(pipeline, "run_retraining", broken)
    with pytest.raises(OSError, match="disk full"):
        tasks.retrain_task("manual")
    assert (runs("busy"), runs("error")) == (before[0] + 1, before[1] + 1)
