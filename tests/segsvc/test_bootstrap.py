"""segsvc/services/bootstrap.py: `segsvc models init` registers the shipped trained model."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from segsvc.db import session_scope
from segsvc.digest import file_sha256
from segsvc.errors import ConflictError
from segsvc.models import ModelStatus, ModelVersion
from segsvc.services import registry, rollout
from segsvc.services.bootstrap import (
    SHIPPED_MODEL,
    SHIPPED_REPORT,
    ensure_production_model,
    refresh_shipped_measures,
    shipped_model,
)
from segsvc.settings import ROOT, Settings

METRICS = {"mean_iou": 0.63}


def write_shipped(folder: Path, content: bytes = b"trained weights") -> Path:
    """A stand-in for models/baseline.keras (+ its report); bootstrap only hashes and copies it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SHIPPED_MODEL).write_bytes(content)
    (folder / SHIPPED_REPORT).write_text(json.dumps({"metrics": METRICS}))
    return folder / SHIPPED_MODEL


def test_shipped_model_dir_defaults_to_the_checkout_models_folder() -> None:
    # In the images the code is /app, so this is /app/models, where the Dockerfile copies it.
    cfg = Settings(_env_file=None)  # type: ignore[call-arg]
    assert cfg.shipped_model_dir == ROOT / "models"
    assert (cfg.shipped_model_dir / SHIPPED_MODEL).is_file()


def test_bootstrap_copies_the_shipped_model_into_an_empty_model_dir(
    settings: Settings, tmp_path: Path
) -> None:
    # Regression: containers set SEG_MODEL_DIR to the (empty) volume, so `models init` built a
    # randomly initialised init.keras and served it as production.
    shipped = write_shipped(tmp_path / "app-models")
    cfg = settings.model_copy(
        update={"model_dir": tmp_path / "volume" / "models", "shipped_model_dir": shipped.parent}
    )
    version, created = ensure_production_model(cfg)
    assert created
    assert version.startswith("baseline-")
    copied = cfg.model_dir / SHIPPED_MODEL
    assert copied.read_bytes() == shipped.read_bytes()
    assert json.loads((cfg.model_dir / SHIPPED_REPORT).read_text())["metrics"] == METRICS
    assert not (cfg.var_dir / "models" / "init.keras").exists()
    assert [p.name for p in cfg.model_dir.iterdir() if p.name.startswith(".")] == []
    with session_scope(cfg) as session:
        row = registry.production_version(session=session)
        assert row is not None
        assert row.status == ModelStatus.PRODUCTION
        assert Path(row.path) == copied.resolve()
        assert row.metrics == METRICS
    assert ensure_production_model(cfg) == (version, False)


def test_a_shipped_model_replaced_where_it_lies_becomes_a_new_production_version(
    settings: Settings, tmp_path: Path
) -> None:
    """`make run` registers models/baseline.keras where it lies; a pull shipping new weights
    (or `segsvc train --out models/baseline.keras`) replaced the serving version's bytes,
    which workers refuse now that their sha256 differs: no worker could load production. The
    next init makes the new bytes production, a version of their own; the old one is
    archived."""
    shipped = write_shipped(tmp_path / "models", b"old weights")
    cfg = settings.model_copy(
        update={"model_dir": shipped.parent, "shipped_model_dir": shipped.parent}
    )
    old, _ = ensure_production_model(cfg)
    assert ensure_production_model(cfg) == (old, False)  # unchanged bytes: nothing to do
    canary_file = tmp_path / "ft-canary.keras"
    canary_file.write_bytes(b"fine-tuned from the old weights")
    with session_scope(cfg) as session:
        registry.register_version(
            session=session, version="ft-canary", path=canary_file, parent_version=old
        )
        rollout.start_canary(session=session, version="ft-canary", share=0.1)
    shipped.write_bytes(b"new weights")
    new, created = ensure_production_model(cfg)
    assert created
    assert new != old
    with session_scope(cfg) as session:
        row = registry.production_version(session=session)
        assert row is not None
        assert row.version == new
        assert row.sha256 == file_sha256(shipped)
        previous = session.get(ModelVersion, old)
        assert previous is not None
        assert previous.status == ModelStatus.ARCHIVED
        assert previous.traffic_share == 0.0
        # Its bytes are gone: never a rollback target, and a canary gated against it stopped.
        assert previous.file_deleted_at is not None
        assert previous.retired_at is not None
        canary = session.get(ModelVersion, "ft-canary")
        assert canary is not None
        assert canary.status == ModelStatus.REJECTED
        with pytest.raises(ConflictError):
            rollout.rollback(session=session)
    assert ensure_production_model(cfg) == (new, False)


def test_bootstrap_prefers_the_model_already_in_model_dir(tmp_path: Path) -> None:
    shipped = write_shipped(tmp_path / "app-models", b"new release")
    own = write_shipped(tmp_path / "volume", b"operator's copy")
    cfg = Settings(
        model_dir=own.parent,
        shipped_model_dir=shipped.parent,
        _env_file=None,  # type: ignore[call-arg]
    )
    found = shipped_model(cfg)
    assert found is not None
    assert found[0] == own
    assert own.read_bytes() == b"operator's copy"


def test_bootstrap_finds_no_shipped_model_when_neither_folder_has_one(tmp_path: Path) -> None:
    cfg = Settings(
        model_dir=tmp_path / "volume",
        shipped_model_dir=tmp_path / "nothing",
        _env_file=None,  # type: ignore[call-arg]
    )
    assert shipped_model(cfg) is None
    assert not (tmp_path / "volume").exists()


def test_a_release_brings_its_new_measures_of_the_shipped_models_runtimes(
    settings: Settings, tmp_path: Path
) -> None:
    """Upgraded converters ship re-measured fingerprints in baseline.json: the registered copy of
    the same weights takes them at the release's `models init`, or its workers (on the new
    converters) would find the old fingerprints and serve exact ONNX Runtime instead."""
    shipped = write_shipped(tmp_path / "app-models")
    cfg = settings.model_copy(
        update={"model_dir": tmp_path / "volume", "shipped_model_dir": shipped.parent}
    )
    version, _ = ensure_production_model(cfg)  # the first release: no runtime measures
    remeasured = {
        **METRICS,
        "faithful_runtimes": ["onnx", "litert-int8"],
        "runtime_agreement": {"litert-int8": {"mask_agreement": 0.997, "converter": "abc"}},
        "runtime_agreement_source": "make bench (the new release)",
    }
    (shipped.parent / SHIPPED_REPORT).write_text(json.dumps({"metrics": remeasured}))
    assert ensure_production_model(cfg) == (version, False)  # the next release
    with session_scope(cfg) as session:
        row = registry.get_version(session=session, version=version)
        assert row.metrics == remeasured
        assert not refresh_shipped_measures(session=session, settings=cfg)  # once only
    with session_scope(cfg) as session:  # an operator's own measure is not overwritten
        row = registry.get_version(session=session, version=version)
        mine = {"litert-int8": {"converter": "arm64", "source": "segsvc models check-runtimes"}}
        row.metrics = {**row.metrics, "runtime_agreement": mine}
    ensure_production_model(cfg)
    with session_scope(cfg) as session:
        row = registry.get_version(session=session, version=version)
        assert row.metrics["runtime_agreement"] == mine


def test_two_inits_at_once_register_one_production(settings: Settings, tmp_path: Path) -> None:
    # Regression: both found no production and both registered it; the second failed on the
    # version's primary key (a retried migrations Job beside an operator's `models init`).
    import threading

    shipped = write_shipped(tmp_path / "app-models")
    cfg = settings.model_copy(
        update={"model_dir": tmp_path / "volume", "shipped_model_dir": shipped.parent}
    )
    start, results, errors = threading.Barrier(2), [], []

    def init() -> None:
        start.wait()
        try:
            results.append(ensure_production_model(cfg))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    runs = [threading.Thread(target=init) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    assert errors == []
    assert sorted(created for _, created in results) == [False, True]
    with session_scope(cfg) as session:
        assert len(registry.list_versions(session=session)) == 1


def test_the_local_key_file_is_owner_only_from_its_creation(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written and then chmod-ed, the admin key was readable by others in between (and kept a
    readable file readable while writing into it)."""
    import os
    import stat

    from segsvc.services.bootstrap import ensure_local_key

    cfg = settings.model_copy(update={"var_dir": tmp_path})
    modes: list[int] = []  # the file's mode when it is opened for the key to go in
    real_fdopen = os.fdopen

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    (tmp_path / "local_api_key").write_text("stale\n")  # left by an earlier run, 0644
    (tmp_path / "local_api_key").chmod(0o644)
    key = ensure_local_key(cfg, name=f"local-{uuid.uuid4()}")
    assert key is not None
    assert (tmp_path / "local_api_key").read_text() == key + "\n"
    assert modes
    assert all(mode == 0o600 for mode in modes)
    assert stat.S_IMODE((tmp_path / "local_api_key").stat().st_mode) == 0o600


def test_a_revoked_local_key_is_replaced(settings: Settings, tmp_path: Path) -> None:
    from segsvc.services.bootstrap import ensure_local_key
    from segsvc.services.keys import revoke_key

    cfg = settings.model_copy(update={"var_dir": tmp_path})
    name = f"local-{uuid.uuid4()}"
    first = ensure_local_key(cfg, name=name)
    assert first is not None
    assert ensure_local_key(cfg, name=name) == first  # kept while it works
    with session_scope(cfg) as session:
        revoke_key(session=session, ref=first[:10])
    second = ensure_local_key(cfg, name=name)
    assert second not in (None, first)
    assert (tmp_path / "local_api_key").read_text() == f"{second}\n"


def test_the_local_key_file_is_replaced_once_its_own_key_is_revoked(
    settings: Settings, tmp_path: Path
) -> None:
    """Another key named like it (`segsvc keys create --name local`) kept a revoked file key
    in use: each start printed it, and the page and scripts got 401."""
    from segsvc.services.bootstrap import ensure_local_key
    from segsvc.services.keys import create_key, revoke_key

    cfg = settings.model_copy(update={"var_dir": tmp_path})
    name = f"local-{uuid.uuid4()}"
    first = ensure_local_key(cfg, name=name)
    with session_scope(cfg) as session:
        create_key(session=session, name=name)
        revoke_key(session=session, ref=first[:10])
    second = ensure_local_key(cfg, name=name)
    assert second != first
    assert (tmp_path / "local_api_key").read_text() == f"{second}\n"
