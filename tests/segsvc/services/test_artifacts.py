"""The artifact cache keeps what the registry may serve (production, canary, rollback targets)
and prunes the rest: the service on the real registry, and `segsvc models prune-artifacts`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from segsvc.db import session_scope
from segsvc.ml.convert import artifact_folder
from segsvc.models import ModelStatus
from segsvc.services import registry, rollout
from segsvc.services.artifacts import prune_artifact_cache
from segsvc.settings import Settings
from tests.segsvc.ml.test_artifact_cache import DAY, age


def sha_of(version: str) -> str:
    return hashlib.sha256(version.encode()).hexdigest()


def add_version(cfg: Settings, version: str, status: ModelStatus = ModelStatus.CANDIDATE) -> None:
    """Register `version` (with a sha256 of its own) and cache its artifacts."""
    with session_scope(cfg) as session:
        registry.register_version(
            session=session,
            version=version,
            path=f"/models/{version}.keras",
            status=status,
            sha256=sha_of(version),
        )
    cache(cfg, version)


def cache(cfg: Settings, version: str) -> Path:
    """A converted ONNX folder of `version`, last used 10 days ago."""
    folder = artifact_folder(cfg.artifact_dir, sha_of(version), "onnx")
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"artifact")
    age(folder, 10 * DAY)
    return folder


def cached_versions(cfg: Settings) -> set[str]:
    names = {sha_of(v): v for v in ("v1", "v2", "v3", "v4", "canary", "rejected", "candidate")}
    return {names[p.name] for p in cfg.artifact_dir.iterdir() if p.name in names}


@pytest.fixture
def cfg(settings: Settings, tmp_path: Path) -> Settings:
    """The test registry and a cache of this test's own, with production v4 (promoted from v3,
    itself from v2, from v1), a canary, a rejected and a candidate version."""
    cfg = settings.model_copy(update={"artifact_cache_dir": tmp_path / "artifacts"})
    add_version(cfg, "v1", ModelStatus.PRODUCTION)
    for version in ("v2", "v3", "v4"):
        add_version(cfg, version)
        with session_scope(cfg) as session:
            rollout.promote(session=session, version=version)
    for version in ("canary", "rejected", "candidate"):
        add_version(cfg, version)
    with session_scope(cfg) as session:
        rollout.start_canary(session=session, version="canary", share=0.1)
        rollout.reject(session=session, version="rejected", reason="test")
    return cfg


def test_prune_artifact_cache_keeps_what_serves_and_what_a_rollback_returns_to(
    cfg: Settings,
) -> None:
    assert cfg.artifact_keep_archived == 2
    prune_artifact_cache(cfg)
    assert cached_versions(cfg) == {"v4", "canary", "v3", "v2"}
    # Production's rollback target is kept even when no other retired version is.
    prune_artifact_cache(cfg.model_copy(update={"artifact_keep_archived": 0}))
    assert cached_versions(cfg) == {"v4", "canary", "v3"}
    with session_scope(cfg) as session:
        rollout.rollback(session=session)  # v3 serves again, and returns to v2 next
    cache(cfg, "v2")  # converted again (it was pruned)
    prune_artifact_cache(cfg.model_copy(update={"artifact_keep_archived": 0}))
    assert cached_versions(cfg) == {"v3", "v2"}


def test_prune_artifact_cache_keeps_anything_used_within_the_grace_period(
    cfg: Settings,
) -> None:
    age(artifact_folder(cfg.artifact_dir, sha_of("v1"), "onnx"), 2 * DAY)
    result = prune_artifact_cache(cfg)
    assert cached_versions(cfg) == {"v4", "canary", "v3", "v2", "v1"}
    assert len(result.removed) == 2  # rejected, candidate
    prune_artifact_cache(cfg, older_than_s=DAY)
    assert cached_versions(cfg) == {"v4", "canary", "v3", "v2"}


def test_cli_prune_artifacts_dry_run_then_for_real(
    cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsvc.cli import main

    monkeypatch.setattr("segsvc.cli.get_settings", lambda: cfg)
    rejected = artifact_folder(cfg.artifact_dir, sha_of("rejected"), "onnx")
    dry = CliRunner().invoke(main, ["models", "prune-artifacts", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would delete {rejected}\n" in dry.output
    assert "would delete 3 (0.0 MB)" in dry.output  # v1, rejected, candidate
    assert len(cached_versions(cfg)) == 7
    real = CliRunner().invoke(main, ["models", "prune-artifacts", "--grace-hours", "300"])
    assert real.exit_code == 0, real.output
    assert "deleted 0 (0.0 MB)" in real.output  # all were used within 12.5 days
    real = CliRunner().invoke(main, ["models", "prune-artifacts"])
    assert real.exit_code == 0, real.output
    assert f"deleted {rejected}\n" in real.output
    assert cached_versions(cfg) == {"v4", "canary", "v3", "v2"}
