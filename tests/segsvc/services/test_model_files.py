"""Pruning the model files retraining wrote to `var_dir/models`: rejected versions' and crashed
runs' files go after the grace period, every other version's stay, and nothing outside the
folder is touched; on the real registry, with `segsvc models prune-files` and a promote after."""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from segsvc.db import session_scope
from segsvc.files import try_lock
from segsvc.models import ModelStatus, ModelVersion, utcnow
from segsvc.retrain_lock import retrain_lock
from segsvc.services import model_files, registry
from segsvc.services.model_files import candidate_path, prune_model_files
from segsvc.services.rollout import ModelFileDeletedError, promote
from segsvc.settings import Settings
from tests.segsvc.ml.test_artifact_cache import DAY, age

OLD = 30 * DAY  # well past the default grace period (7 days)


@pytest.fixture
def cfg(settings: Settings, tmp_path: Path) -> Settings:
    """The test registry with a production version, and a var_dir of this test's own."""
    cfg = settings.model_copy(update={"var_dir": tmp_path / "var"})
    model_files.models_dir(cfg).mkdir(parents=True)
    shipped = write(cfg.var_dir / "models" / "baseline.keras", OLD)
    add_version(cfg, "baseline", shipped, ModelStatus.PRODUCTION)
    return cfg


def write(path: Path, seconds_ago: float, size: int = 1000) -> Path:
    """A file of `size` bytes at `path`, last written `seconds_ago`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"w" * size)
    age(path, seconds_ago)
    return path


def candidate(cfg: Settings, seconds_ago: float = OLD, *, report: bool = True) -> Path:
    """A run's candidate file (and its training report), written `seconds_ago`."""
    path = candidate_path(cfg, run_id=uuid.uuid4(), at=utcnow() - timedelta(seconds=seconds_ago))
    if report:
        write(path.with_suffix(".json"), seconds_ago, size=100)
    return write(path, seconds_ago)


def add_version(
    cfg: Settings, version: str, path: Path, status: ModelStatus, retired_ago: float = OLD
) -> None:
    """Register `path` as `version` with `status` (retired `retired_ago` if not serving)."""
    with session_scope(cfg) as session:
        row = registry.register_version(
            session=session, version=version, path=path, status=status, sha256="0" * 64
        )
        if status in (ModelStatus.REJECTED, ModelStatus.ARCHIVED):
            row.retired_at = utcnow() - timedelta(seconds=retired_ago)


def deleted_at(cfg: Settings, version: str) -> object:
    with session_scope(cfg) as session:
        return registry.get_version(session=session, version=version).file_deleted_at


def files(cfg: Settings) -> set[str]:
    """Every file under var_dir (but the pruner's lock file), relative to it."""
    return {
        str(p.relative_to(cfg.var_dir))
        for p in cfg.var_dir.rglob("*")
        if p.is_file() and p.name != ".prune.lock"
    }


def test_prune_model_files_deletes_old_rejected_versions_files_and_marks_their_rows(
    cfg: Settings,
) -> None:
    rejected = candidate(cfg)
    add_version(cfg, "rejected", rejected, ModelStatus.REJECTED)
    result = prune_model_files(cfg)
    assert sorted(result.removed) == [rejected.with_suffix(".json"), rejected]
    assert result.versions == ["rejected"]
    assert result.freed_bytes == 1100
    assert not rejected.exists()
    assert not rejected.with_suffix(".json").exists()
    assert deleted_at(cfg, "rejected") is not None  # the row stays, and says so
    assert deleted_at(cfg, "baseline") is None
    assert prune_model_files(cfg).removed == []


def test_a_rejection_ages_on_the_database_clock_whatever_this_hosts_says(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version rejected a day ago (on the database's clock) keeps its files for the grace
    period even on a host whose clock runs eight days fast; its files' own age is the file
    system's, and theirs is past the grace period either way."""
    rejected = candidate(cfg)  # written 30 days ago
    add_version(cfg, "rejected", rejected, ModelStatus.REJECTED, retired_ago=DAY)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 8 * DAY)
    assert prune_model_files(cfg).removed == []
    monkeypatch.setattr(time, "time", real)
    assert rejected.exists()
    assert deleted_at(cfg, "rejected") is None


def test_prune_model_files_keeps_the_files_of_versions_that_may_serve(cfg: Settings) -> None:
    kept = (ModelStatus.PRODUCTION, ModelStatus.CANARY, ModelStatus.CANDIDATE, ModelStatus.ARCHIVED)
    for status in kept:
        add_version(cfg, str(status), candidate(cfg), status)
    # Files of the folder that are not this service's candidates: the untrained model, one an
    # operator put there by hand.
    for name in ("init.keras", "ft-by-hand.keras"):
        write(cfg.var_dir / "models" / name, OLD)
    before = files(cfg)
    result = prune_model_files(cfg, older_than_s=0)
    assert result.removed == []
    assert files(cfg) == before
    assert "models/baseline.keras" in before


def test_archived_versions_past_the_rollback_targets_lose_their_files(cfg: Settings) -> None:
    """Every promotion archived the old production's ~27 MB for ever. Production's parent and
    the newest `model_keep_archived` archived versions stay: what a rollback restores."""
    cfg = cfg.model_copy(update={"model_keep_archived": 2})
    archived = {}
    for i, name in enumerate(("a-oldest", "b-older", "c-parent", "d-newer", "e-newest")):
        archived[name] = candidate(cfg)
        add_version(cfg, name, archived[name], ModelStatus.ARCHIVED, retired_ago=OLD - i * DAY)
    with session_scope(cfg) as session:  # production descends from an older archived one
        registry.get_version(session=session, version="baseline").parent_version = "c-parent"
    result = prune_model_files(cfg)
    assert sorted(result.versions) == ["a-oldest", "b-older"]
    assert {name for name, path in archived.items() if path.exists()} == {
        "c-parent",
        "d-newer",
        "e-newest",
    }
    assert deleted_at(cfg, "a-oldest") is not None
    assert deleted_at(cfg, "c-parent") is None


def test_temporary_files_of_a_write_killed_mid_way_are_pruned(cfg: Settings) -> None:
    """A run killed while saving its candidate left `.ft-....tmp.keras` (tens of MB) on the
    shared volume, which nothing matched."""
    stem = candidate(cfg).stem
    folder = model_files.models_dir(cfg)
    old = write(folder / f".{stem}.keras.4242.0123abcd.tmp.keras", OLD)  # replace_atomically's
    report = write(folder / f".{stem}.json.4242.0123abcd.tmp", OLD)
    fresh = write(folder / f".{stem}.keras.4243.987654ab.tmp.keras", 60)
    mine = write(folder / ".by-hand.tmp.keras", OLD)  # not this service's: stays
    result = prune_model_files(cfg)
    assert old in result.removed
    assert report in result.removed
    assert not old.exists()
    assert not report.exists()
    assert fresh.exists()  # a write that may still be going on
    assert mine.exists()


def test_prune_model_files_deletes_orphans_after_the_grace_period_only(cfg: Settings) -> None:
    crashed = candidate(cfg, 8 * DAY)  # a run died before registering it
    fresh = candidate(cfg, 1 * DAY, report=False)  # a run just wrote it
    recently_rejected = candidate(cfg, OLD)  # rejected (rolled back) only yesterday
    add_version(cfg, "recent", recently_rejected, ModelStatus.REJECTED, retired_ago=DAY)
    result = prune_model_files(cfg)
    assert sorted(result.removed) == [crashed.with_suffix(".json"), crashed]
    assert result.versions == []
    assert fresh.is_file()
    assert recently_rejected.is_file()
    assert deleted_at(cfg, "recent") is None
    assert sorted(prune_model_files(cfg, older_than_s=0).removed) == sorted(
        [fresh, recently_rejected, recently_rejected.with_suffix(".json")]
    )


def test_prune_model_files_never_touches_files_outside_the_models_folder(
    cfg: Settings, tmp_path: Path
) -> None:
    name = candidate_path(cfg, run_id=uuid.uuid4(), at=utcnow()).name
    elsewhere = write(tmp_path / "elsewhere" / name, OLD)  # a row may point anywhere
    add_version(cfg, "elsewhere", elsewhere, ModelStatus.REJECTED)
    twin = write(cfg.var_dir / "models" / name, OLD)  # same name, but not the row's file
    write(cfg.var_dir / name, OLD)  # beside the folder, or below it: not this service's
    write(cfg.var_dir / "models" / "old" / name, OLD)
    target = write(tmp_path / "target.keras", OLD)
    link = candidate_path(cfg, run_id=uuid.uuid4(), at=utcnow())
    link.symlink_to(target)
    before = files(cfg)
    result = prune_model_files(cfg, older_than_s=0)
    assert result.removed == []
    assert files(cfg) == before
    assert elsewhere.is_file()
    assert twin.is_file()
    assert target.is_file()
    assert deleted_at(cfg, "elsewhere") is None


def test_prune_model_files_dry_run_deletes_and_marks_nothing(cfg: Settings) -> None:
    rejected, orphan = candidate(cfg), candidate(cfg, report=False)
    add_version(cfg, "rejected", rejected, ModelStatus.REJECTED)
    before = files(cfg)
    dry = prune_model_files(cfg, dry_run=True)
    assert files(cfg) == before
    assert deleted_at(cfg, "rejected") is None
    assert sorted(dry.removed) == sorted([rejected, rejected.with_suffix(".json"), orphan])
    assert dry.versions == ["rejected"]
    real = prune_model_files(cfg)
    assert (sorted(real.removed), real.freed_bytes) == (sorted(dry.removed), dry.freed_bytes)


def test_prune_model_files_keeps_orphans_while_a_retraining_run_holds_the_lock(
    cfg: Settings,
) -> None:
    rejected, orphan = candidate(cfg), candidate(cfg)
    add_version(cfg, "rejected", rejected, ModelStatus.REJECTED)
    with retrain_lock(cfg) as held:
        assert held
        result = prune_model_files(cfg)
        assert result.orphans_skipped
        assert result.versions == ["rejected"]
        assert orphan.is_file()
        # The run itself prunes at its end, holding the lock: nothing else writes one then.
        assert prune_model_files(cfg, holding_retrain_lock=True).removed == [
            orphan.with_suffix(".json"),
            orphan,
        ]


def test_only_one_model_file_pruner_runs_at_a_time(cfg: Settings) -> None:
    orphan = candidate(cfg)
    with try_lock(cfg.var_dir / "models" / ".prune.lock") as held:
        assert held
        result = prune_model_files(cfg)
    assert result.skipped
    assert orphan.is_file()


def test_a_failed_commit_puts_the_files_back(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    rejected = candidate(cfg)
    add_version(cfg, "rejected", rejected, ModelStatus.REJECTED)

    real_db_time, calls = model_files.db_time, []

    def database_gone(session: object) -> object:
        calls.append(session)
        if len(calls) > 1:  # the deletion's stamp: after the rename, before the commit
            raise RuntimeError("database gone")
        return real_db_time(session)  # type: ignore[arg-type]

    monkeypatch.setattr(model_files, "db_time", database_gone)
    with pytest.raises(RuntimeError, match="database gone"):
        prune_model_files(cfg)
    assert len(calls) == 2  # it failed at the deletion's stamp, after the rename
    assert rejected.is_file()
    assert rejected.with_suffix(".json").is_file()
    assert deleted_at(cfg, "rejected") is None


def test_files_a_dead_pruner_set_aside_are_put_back_and_decided_again(cfg: Settings) -> None:
    kept, gone = candidate(cfg, report=False), candidate(cfg, report=False)
    add_version(cfg, "archived", kept, ModelStatus.ARCHIVED)
    add_version(cfg, "rejected", gone, ModelStatus.REJECTED)
    for path in (kept, gone):  # a pruner died between its rename and its commit
        os.rename(path, path.with_name(f".{path.name}.prune-0123abcd"))
    assert prune_model_files(cfg).removed == [gone]
    assert files(cfg) == {"models/baseline.keras", f"models/{kept.name}"}


def test_cli_prune_files_then_promote_of_a_pruned_version_fails_clearly(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsvc.cli import main

    monkeypatch.setattr("segsvc.cli.get_settings", lambda: cfg)
    monkeypatch.setattr("segsvc.db.get_settings", lambda: cfg)
    rejected = candidate(cfg, 3 * DAY)
    add_version(cfg, "rejected", rejected, ModelStatus.REJECTED)

    dry = CliRunner().invoke(main, ["models", "prune-files", "--dry-run", "--grace-days", "2"])
    assert dry.exit_code == 0, dry.output
    assert f"would delete {rejected}\n" in dry.output
    assert "would delete 2 files (0.0 MB) of 1 rejected versions, 0 archived" in dry.output
    kept = CliRunner().invoke(main, ["models", "prune-files"])  # 7 days by default
    assert "deleted 0 files" in kept.output
    real = CliRunner().invoke(main, ["models", "prune-files", "--grace-days", "2"])
    assert real.exit_code == 0, real.output
    assert f"deleted {rejected}\n" in real.output
    assert not rejected.exists()

    listed = CliRunner().invoke(main, ["models", "list"])
    assert f"{rejected.name} (file deleted)" in listed.output
    promoted = CliRunner().invoke(main, ["models", "promote", "rejected"])
    assert promoted.exit_code == 1
    assert "rejected cannot serve again: its model file" in promoted.output
    assert "was deleted on" in promoted.output
    assert "Traceback" not in promoted.output
    with session_scope(cfg) as session:
        with pytest.raises(ModelFileDeletedError):
            promote(session=session, version="rejected")
        row = session.get(ModelVersion, "rejected")
        assert row is not None
        assert row.status == ModelStatus.REJECTED


def test_cli_prune_files_counts_archived_versions_apart_from_rejected_ones(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Archived versions past the rollback targets lose their files too: the summary called
    them "rejected versions"."""
    from segsvc.cli import main

    cfg = cfg.model_copy(update={"model_keep_archived": 1})
    monkeypatch.setattr("segsvc.cli.get_settings", lambda: cfg)
    monkeypatch.setattr("segsvc.db.get_settings", lambda: cfg)
    for i in range(3):  # the newest one stays: the rollback target
        add_version(cfg, f"old-{i}", candidate(cfg), ModelStatus.ARCHIVED, OLD - i * DAY)
    add_version(cfg, "rejected", candidate(cfg), ModelStatus.REJECTED)
    result = CliRunner().invoke(main, ["models", "prune-files"])
    assert result.exit_code == 0, result.output
    assert "deleted 6 files (0.0 MB) of 1 rejected versions, 2 archived versions past " in (
        result.output
    )
    help_text = CliRunner().invoke(main, ["models", "prune-files", "--help"]).output
    assert "archived versions' past the rollback targets" in " ".join(help_text.split())


def scratch(cfg: Settings, seconds_ago: float, name: str | None = None) -> Path:
    """A retraining run's scratch folder (its checkpoint inside), last written `seconds_ago`."""
    folder = cfg.var_dir / "retrain" / (name or str(uuid.uuid4()))
    write(folder / "best.keras", seconds_ago)
    age(folder, seconds_ago)
    return folder


def test_prune_model_files_deletes_crashed_runs_scratch_folders_after_the_grace_period(
    cfg: Settings,
) -> None:
    crashed = scratch(cfg, OLD)  # a run killed mid-training leaves its checkpoint behind
    running = scratch(cfg, 60)
    foreign = scratch(cfg, OLD, name="notes")  # not a run's folder: never touched
    assert prune_model_files(cfg, dry_run=True).removed == [crashed]
    assert crashed.is_dir()
    with retrain_lock(cfg) as idle:  # a run is going on: its scratch may be any age
        assert idle
        assert crashed not in prune_model_files(cfg).removed
    assert crashed.is_dir()
    result = prune_model_files(cfg)
    assert result.removed == [crashed]
    assert result.freed_bytes >= 1000
    assert not crashed.exists()
    assert running.is_dir()
    assert foreign.is_dir()


def test_a_rejected_versions_comparison_sheet_goes_with_its_model_file(cfg: Settings) -> None:
    """The sheet a run draws beside its candidate (`<candidate>.png`) is one of its files."""
    rejected = candidate(cfg)
    sheet = write(rejected.with_suffix(".png"), OLD, size=50)
    add_version(cfg, "rejected", rejected, ModelStatus.REJECTED)
    result = prune_model_files(cfg)
    assert sorted(result.removed) == [rejected.with_suffix(".json"), rejected, sheet]
    assert result.freed_bytes == 1150
    assert not sheet.exists()
