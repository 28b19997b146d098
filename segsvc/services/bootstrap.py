"""First-run setup: a production model and (for the embedded default) a local API key."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from segsvc.db import session_scope
from segsvc.digest import file_sha256
from segsvc.files import write_atomically
from segsvc.models import ApiKey, ModelStatus, ModelVersion
from segsvc.services import registry, rollout
from segsvc.services.keys import create_key, hash_key
from segsvc.settings import Settings, get_settings

SHIPPED_MODEL = "baseline.keras"
SHIPPED_REPORT = "baseline.json"


def shipped_model(settings: Settings) -> tuple[Path, dict[str, Any]] | None:
    """The shipped model in `model_dir` (copied there from `shipped_model_dir` when absent)
    and its metrics; None when neither folder has it."""
    path = settings.model_dir / SHIPPED_MODEL
    if not path.is_file() and not _install_shipped_model(settings):
        return None
    report_path = settings.model_dir / SHIPPED_REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return path, dict(report.get("metrics", {}))


def ensure_production_model(settings: Settings | None = None) -> tuple[str, bool]:
    """Register the shipped model (else a freshly initialised one) unless production exists,
    or production is the shipped file and its bytes were replaced where it lies."""
    settings = settings or get_settings()
    with session_scope(settings) as session:
        # Two inits at once (a retried Job beside a manual one) both found no production and
        # both registered it: the second failed on the version's primary key.
        rollout.lock_registry(session)
        current = registry.production_version(session=session)
        if current is not None and not _replaced_in_place(current):
            refresh_shipped_measures(session=session, settings=settings)
            return current.version, False
        if current is not None:
            # `make run` registers models/baseline.keras where it lies: a pull that ships new
            # weights, or `segsvc train --out models/baseline.keras`, replaced the bytes of the
            # version serving, which workers now refuse (its sha256 no longer matches). The old
            # bytes are gone, so the new ones become production, as a version of their own.
            rollout.retire_replaced_production(
                session=session,
                current=current,
                reason=f"its file {current.path} was replaced by other weights",
            )
        shipped = shipped_model(settings)
        if shipped is not None:
            path, metrics = shipped
        else:
            path, metrics = _initialise_model(settings), {"note": "untrained initialisation"}
        sha = file_sha256(path)
        version = f"{path.stem}-{sha[:8]}"
        existing = session.get(ModelVersion, version)
        if existing is not None:
            existing.status = ModelStatus.PRODUCTION
            existing.traffic_share = 1.0
            existing.file_deleted_at = None  # its bytes are back where it lies
            return version, False
        registry.register_version(
            session=session,
            version=version,
            path=path.resolve(),
            metrics=metrics,
            status=ModelStatus.PRODUCTION,
            sha256=sha,
        )
        return version, True


def _replaced_in_place(version: ModelVersion) -> bool:
    """Whether `version` is a shipped model file whose bytes are no longer those registered."""
    path = Path(version.path)
    return path.name == SHIPPED_MODEL and path.is_file() and file_sha256(path) != version.sha256


# What the shipped report measured about the runtimes: a release that upgrades the converters
# ships them measured again (models/baseline.json), and workers trust a converted runtime only
# with its own converters' fingerprint (segsvc.ml.runtime.faithful_runtimes).
RUNTIME_MEASURES = ("faithful_runtimes", "runtime_agreement", "runtime_agreement_source")


def refresh_shipped_measures(*, session: Session, settings: Settings) -> bool:
    """Give the registered copy of the shipped model (any status) this release's measures of
    its runtimes, when they differ and no operator measured it since; True when they did.
    Without this a deployment upgraded to new converters kept the old release's fingerprints,
    and its workers served exact ONNX Runtime where the new release had measured LiteRT int8
    faithful."""
    source = settings.shipped_model_dir
    if not (source / SHIPPED_MODEL).is_file() or not (source / SHIPPED_REPORT).is_file():
        return False
    report = json.loads((source / SHIPPED_REPORT).read_text()).get("metrics", {})
    measures = {key: report[key] for key in RUNTIME_MEASURES if key in report}
    sha = file_sha256(source / SHIPPED_MODEL)
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.sha256 == sha).with_for_update().limit(1)
    )
    if row is None or not measures:
        return False
    if all(row.metrics.get(key) == value for key, value in measures.items()):
        return False
    agreement = row.metrics.get("runtime_agreement") or {}
    if any("source" in entry for entry in agreement.values()):
        # An operator measured it here (`segsvc models check-runtimes`), maybe for converters
        # of their own (another architecture): theirs stands until they measure again.
        return False
    row.metrics = {**row.metrics, **measures}
    return True


def _install_shipped_model(settings: Settings) -> bool:
    """Copy the shipped model and its report into `model_dir`; False when there is none.

    The images carry it in the code (/app/models) while `model_dir` is the shared volume: the
    registered path must be one every pod of every later release can read.
    """
    source = settings.shipped_model_dir
    if not (source / SHIPPED_MODEL).is_file():
        return False
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    # The report first: a model file in model_dir always has its metrics beside it.
    for name in (SHIPPED_REPORT, SHIPPED_MODEL):
        if (source / name).is_file():
            # Never a half-written model, even after a crash.
            write_atomically(settings.model_dir / name, (source / name).read_bytes())
    return True


def _initialise_model(settings: Settings) -> Path:
    from segsvc.ml.unet import build_unet

    out = settings.var_dir / "models" / "init.keras"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        build_unet(encoder_weights=settings.encoder_weights).save(out)
    return out


def ensure_local_key(settings: Settings | None = None, *, name: str = "local") -> str:
    """The embedded default's admin key, from `var_dir/local_api_key`: made (and the file
    written) when there is none, or when the key in the file was revoked or is unknown."""
    settings = settings or get_settings()
    key_file = settings.var_dir / "local_api_key"
    with session_scope(settings) as session:
        saved = key_file.read_text().strip() if key_file.is_file() else ""
        # The file's own key, not any key of that name: after `segsvc keys create --name
        # local`, revoking the file's key (leaked, say) left it printed at every start.
        usable = saved and session.scalar(
            select(ApiKey.id)
            .where(ApiKey.key_hash == hash_key(saved), ApiKey.revoked_at.is_(None))
            .limit(1)
        )
        if usable:
            return saved
        _, plaintext = create_key(session=session, name=name, is_admin=True)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    # Created owner-only (an existing file is made so first): never readable by others, not
    # even between a write and a chmod.
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    with os.fdopen(fd, "w") as out:
        out.write(plaintext + "\n")
    return plaintext
