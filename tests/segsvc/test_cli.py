"""The operator CLI (`segsvc`): retraining runs and logs, migrations, the model list."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update

from segsvc.cli import main
from segsvc.db import session_scope
from segsvc.models import TrainingRun, utcnow
from segsvc.settings import Settings, get_settings
from tests.segsvc.test_blob_mark import unmount


@pytest.fixture
def as_process(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI's `get_settings()` on the test database."""
    monkeypatch.setenv("SEG_DATABASE_URL", settings.database_url or "")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def run_alive(settings: Settings) -> Iterator[None]:
    """The retraining lock held, on a connection of its own, as a live run's process holds
    it: without a holder a `running` row is a run whose process died (shown interrupted)."""
    from segsvc.retrain_lock import retrain_lock

    with retrain_lock(settings) as held:
        assert held
        yield


def add_run(settings: Settings, status: str, log: str, minutes_ago: int, **extra: object) -> str:
    run_id = uuid.uuid4()
    with session_scope(settings) as session:
        session.add(
            TrainingRun(
                id=run_id,
                status=status,
                trigger="manual",
                started_at=utcnow() - timedelta(minutes=minutes_ago),
                log=log,
                data_counts={"labels": 7},
                **extra,
            )
        )
    return str(run_id)


def test_retrain_runs_lists_runs_newest_first_a_running_one_with_its_latest_line(
    settings: Settings, as_process: None, run_alive: None
) -> None:
    done = add_run(
        settings, "completed", "a\nb\n", 90, reason="candidate x rejected", duration_s=1234.0
    )
    running = add_run(settings, "running", "snapshot: 7 labels\nepoch 2/3 (610 s): loss 0.4\n", 5)
    result = CliRunner().invoke(main, ["retrain", "runs"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{running} running")
    assert lines[0].endswith("labels=7 epoch 2/3 (610 s): loss 0.4")
    assert lines[1].startswith(f"{done} completed")
    assert "1234s labels=7 candidate x rejected" in lines[1]


def test_retrain_log_prints_a_runs_log_and_follows_a_running_one_to_its_end(
    settings: Settings, as_process: None, run_alive: None
) -> None:
    older = add_run(settings, "failed", "old line\n", 60, reason="boom")
    running = add_run(settings, "running", "snapshot: 7 labels\n", 1)

    def progress() -> None:  # what the run's progress thread and its end write meanwhile
        time.sleep(0.5)
        with session_scope(settings) as session:
            session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == uuid.UUID(running))
                .values(log="snapshot: 7 labels\nepoch 1/3 (5 s): loss 0.5\n")
            )
        time.sleep(2.5)
        with session_scope(settings) as session:
            session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == uuid.UUID(running))
                .values(
                    status="completed",
                    reason="candidate y passed the gate",
                    log="snapshot: 7 labels\nepoch 1/3 (5 s): loss 0.5\nrun completed\n",
                )
            )

    writer = threading.Thread(target=progress)
    writer.start()
    followed = CliRunner().invoke(main, ["retrain", "log", "--follow"])
    writer.join()
    assert followed.exit_code == 0, followed.output
    assert followed.output == (
        "snapshot: 7 labels\nepoch 1/3 (5 s): loss 0.5\nrun completed\n"
        f"run {running}: completed: candidate y passed the gate\n"
    )
    one = CliRunner().invoke(main, ["retrain", "log", older])
    assert one.output == f"old line\nrun {older}: failed: boom\n"
    unknown = CliRunner().invoke(main, ["retrain", "log", str(uuid.uuid4())])
    assert unknown.exit_code == 1
    assert "no retraining run" in unknown.output
    bad = CliRunner().invoke(main, ["retrain", "log", "nope"])
    assert bad.exit_code == 2
    by_start = CliRunner().invoke(main, ["retrain", "log", older[:8]])  # as `runs` shows it
    assert by_start.output == one.output
    none = CliRunner().invoke(main, ["retrain", "log", "ffffffff"])
    assert none.exit_code == 1
    assert "no retraining runs start with 'ffffffff'" in none.output


def test_a_running_run_whose_process_died_shows_interrupted_and_follow_stops(
    settings: Settings, as_process: None
) -> None:
    """A run whose process died (an OOM-killed maintenance worker) said `running` until the
    next run's start marked it failed: `retrain runs` showed it running and `retrain log
    --follow` looped for ever."""
    dead = add_run(settings, "running", "snapshot: 7 labels\nepoch 1/3 (5 s): loss 0.5\n", 5)
    listed = CliRunner().invoke(main, ["retrain", "runs"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.startswith(f"{dead} interrupted ")
    assert "the process running it ended" in listed.output

    followed: list[Result] = []

    def follow() -> None:
        followed.append(CliRunner().invoke(main, ["retrain", "log", "--follow"]))

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "--follow never stopped on a run whose process died"
    [result] = followed
    assert result.exit_code == 1, result.output
    said = (
        f"run {dead}: interrupted: the process running it ended (no process holds the "
        "retraining lock); the next run marks it failed\n"
    )
    assert result.output == "snapshot: 7 labels\nepoch 1/3 (5 s): loss 0.5\n" + said
    once = CliRunner().invoke(main, ["retrain", "log", dead])
    assert once.exit_code == 0, once.output
    assert once.output.endswith(said)
    with session_scope(settings) as session:  # shown so, never written
        assert session.get(TrainingRun, uuid.UUID(dead)).status == "running"  # type: ignore[union-attr]


def test_a_running_run_with_a_lock_holder_still_shows_running(
    settings: Settings, as_process: None, run_alive: None
) -> None:
    alive = add_run(settings, "running", "snapshot: 7 labels\n", 5)
    listed = CliRunner().invoke(main, ["retrain", "runs"])
    assert listed.output.startswith(f"{alive} running ")
    shown = CliRunner().invoke(main, ["retrain", "log", alive])
    assert shown.output == f"snapshot: 7 labels\nrun {alive}: running\n"


def test_retrain_runs_says_when_there_is_none_yet(settings: Settings, as_process: None) -> None:
    result = CliRunner().invoke(main, ["retrain", "runs"])
    assert result.exit_code == 0
    assert result.output.startswith("no retraining run yet")


def test_retrain_now_queue_says_which_task_it_sent_and_how_to_follow_it(
    settings: Settings, as_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import redis

    monkeypatch.setenv("SEG_BROKER_URL", settings.broker_url or "")
    get_settings.cache_clear()
    result = CliRunner().invoke(main, ["retrain", "now", "--queue"])
    assert result.exit_code == 0, result.output
    queued = redis.Redis.from_url(settings.broker_url or "").lrange("maintenance", 0, -1)
    assert len(queued) == 1
    task_id = json.loads(queued[0])["headers"]["id"]
    assert f"sent to the maintenance queue (task {task_id})" in result.output
    assert "segsvc retrain log --follow" in result.output


def test_db_upgrade_reports_the_revision_the_database_is_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--revision R` older than the database did nothing, yet said `database at R`; an
    unknown one printed Alembic's traceback."""
    from segsvc.schema import code_revisions
    from tests.conftest import postgres_database

    (head,) = code_revisions()[1]
    with postgres_database(f"segsvc_cli_{uuid.uuid4().hex[:8]}") as url:
        monkeypatch.setenv("SEG_DATABASE_URL", url)
        get_settings.cache_clear()
        try:
            runner = CliRunner()
            to_0005 = runner.invoke(main, ["db", "upgrade", "--revision", "0005"])
            back = runner.invoke(main, ["db", "upgrade", "--revision", "0003"])
            unknown = runner.invoke(main, ["db", "upgrade", "--revision", "bogus"])
            latest = runner.invoke(main, ["db", "upgrade"])
        finally:
            get_settings.cache_clear()
    assert to_0005.exit_code == 0, to_0005.output
    assert to_0005.output.startswith("database at 0005: ")
    assert back.exit_code == 1
    assert "database at 0005, not 0003" in back.output
    assert "an upgrade never goes back" in back.output
    assert unknown.exit_code == 1
    assert unknown.output.startswith("Error: migration refused: ")
    assert "Traceback" not in unknown.output
    assert latest.exit_code == 0, latest.output
    assert latest.output.startswith(f"database at {head}: ")


def test_models_list_says_on_what_images_each_miou_was_measured(
    settings: Settings, as_process: None, tmp_path: Path
) -> None:
    """The shipped model's mIoU (its training data's validation split) and a retrained one's
    (the evaluation folder) stood side by side as if comparable: a candidate that beat
    production on the evaluation set could look worse than the baseline."""
    from segsvc.models import ModelStatus
    from segsvc.services import registry

    shipped = {"mean_iou": 0.634781234, "split": "val", "images": 113}
    retrained = {
        "mean_iou": 0.58,
        "images": 40,
        "lineage_best": {"eval_set": "3f2a1b0c" + "0" * 56, "mean_iou": 0.55},
        "evaluated_against": {"version": "baseline-1", "mean_iou": 0.55},
    }
    with session_scope(settings) as session:
        for version, status, metrics in (
            ("baseline-1", ModelStatus.PRODUCTION, shipped),
            ("ft-1", ModelStatus.CANARY, retrained),
        ):
            registry.register_version(
                session=session,
                version=version,
                path=tmp_path / f"{version}.keras",
                status=status,
                sha256="0" * 64,
                metrics=metrics,
            )
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    shown = {line.split()[0]: line for line in result.output.splitlines()}
    assert "miou=0.6348 (val split of its training data, 113 images)" in shown["baseline-1"]
    retrained = "miou=0.5800 (vs 0.5500 of baseline-1, evaluation set 3f2a1b0c, 40 images)"
    assert retrained in shown["ft-1"]


def test_retrain_log_follows_a_log_stored_at_its_cap(
    settings: Settings, as_process: None, run_alive: None
) -> None:
    """The stored log is its last 64 KB: once there, each flush had the same length, and the
    follower printed nothing more (the newest epochs, the verdict)."""
    from retrain.pipeline import LOG_CAP

    full = "".join(f"epoch {i}/9999 (5 s): loss 0.5 {'x' * 40}\n" for i in range(2000))
    running = add_run(settings, "running", full[-LOG_CAP:], 1)  # at the cap already
    later = full + "".join(f"epoch {i}/9999 (5 s): loss 0.4\n" for i in range(2000, 2100))

    def progress() -> None:
        time.sleep(0.5)
        with session_scope(settings) as session:
            session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == uuid.UUID(running))
                .values(log=later[-LOG_CAP:])
            )
        time.sleep(2.5)
        with session_scope(settings) as session:
            session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == uuid.UUID(running))
                .values(log=(later + "run completed\n")[-LOG_CAP:], status="completed")
            )

    writer = threading.Thread(target=progress)
    writer.start()
    followed = CliRunner().invoke(main, ["retrain", "log", "--follow"])
    writer.join()
    assert followed.exit_code == 0, followed.output
    assert followed.output == full[-LOG_CAP:] + later[len(full) :] + "run completed\n" + (
        f"run {running}: completed\n"
    )


def test_models_reject_stops_a_canary_and_leaves_production(
    settings: Settings, as_process: None, tmp_path: Path
) -> None:
    """Only promote and rollback existed: stopping a bad canary meant rolling back a healthy
    production with it."""
    from segsvc.models import ModelStatus
    from segsvc.services import registry, rollout

    with session_scope(settings) as session:
        for version, status in (
            ("prod-1", ModelStatus.PRODUCTION),
            ("cand-1", ModelStatus.CANDIDATE),
        ):
            registry.register_version(
                session=session,
                version=version,
                path=tmp_path / f"{version}.keras",
                status=status,
                sha256="0" * 64,
            )
        rollout.start_canary(session=session, version="cand-1", share=0.1)
    result = CliRunner().invoke(main, ["models", "reject", "cand-1"])
    assert result.exit_code == 0, result.output
    assert result.output == "rejected cand-1\n"
    with session_scope(settings) as session:
        cand = registry.get_version(session=session, version="cand-1")
        assert (cand.status, cand.traffic_share) == ("rejected", 0.0)
        assert cand.reason == "rejected by an operator (cli)"
        prod = registry.get_version(session=session, version="prod-1")
        assert (prod.status, prod.traffic_share) == ("production", 1.0)
    again = CliRunner().invoke(main, ["models", "reject", "cand-1"])
    assert again.exit_code == 1
    assert "cand-1 is already rejected: rejected by an operator (cli)" in again.output
    production = CliRunner().invoke(main, ["models", "reject", "prod-1"])
    assert production.exit_code == 1
    assert "prod-1 is production; roll back instead." in production.output
    unknown = CliRunner().invoke(main, ["models", "reject", "nope"])
    assert unknown.exit_code == 1
    assert "No model version 'nope'." in unknown.output


def test_blobs_adopt_makes_the_folder_the_store_after_asking(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsvc import blob_mark
    from segsvc.blob_mark import StoreNotMarkedError, read_mark
    from segsvc.blobs import blob_store

    blob_mark.forget()
    folder = tmp_path / "blobs"
    cfg = settings.model_copy(update={"blob_store": "fs", "blob_dir": folder})
    monkeypatch.setattr("segsvc.cli.get_settings", lambda: cfg)
    blob_store(cfg).put(b"a mask")
    store_id = read_mark(folder)
    assert store_id is not None
    unmount(folder)  # a new, empty volume in its place
    with pytest.raises(StoreNotMarkedError):
        blob_store(cfg).put(b"an upload")
    declined = CliRunner().invoke(main, ["blobs", "adopt"], input="n\n")
    assert declined.exit_code == 1
    assert "no mark" in declined.output
    assert read_mark(folder) is None
    adopted = CliRunner().invoke(main, ["blobs", "adopt"], input="y\n")
    assert adopted.exit_code == 0, adopted.output
    assert f"{folder} is now the blob store ({store_id[:12]}...)" in adopted.output
    assert read_mark(folder) == store_id
    blob_store(cfg).put(b"an upload")
    again = CliRunner().invoke(main, ["blobs", "adopt", "--yes"])
    assert "already the blob store" in again.output


def test_blobs_sweep_of_a_folder_that_is_not_the_store_is_one_line_not_a_traceback(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsvc import blob_mark
    from segsvc.blobs import blob_store

    blob_mark.forget()
    folder = tmp_path / "blobs"
    cfg = settings.model_copy(update={"blob_store": "fs", "blob_dir": folder})
    monkeypatch.setattr("segsvc.cli.get_settings", lambda: cfg)
    monkeypatch.setattr("retrain.tasks.get_settings", lambda: cfg)
    blob_store(cfg).put(b"a mask")
    unmount(folder)
    result = CliRunner().invoke(main, ["blobs", "sweep", "--grace-hours", "1"])
    assert result.exit_code == 1
    assert "Nothing was deleted." in result.output
    assert "Traceback" not in result.output
