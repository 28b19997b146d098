"""The model registry: versions, their artifacts and which one serves."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, defer

from segsvc.digest import file_sha256
from segsvc.errors import NotFoundError
from segsvc.models import ModelStatus, ModelVersion, TrainingRun, db_time
from segsvc.retrain_lock import retrain_lock_taken
from segsvc.settings import Settings

# How a `running` training run whose process is gone is shown (its row is not written: the
# next run marks it failed, `retrain.pipeline._Run._open`).
INTERRUPTED = "interrupted"
INTERRUPTED_REASON = (
    "the process running it ended (no process holds the retraining lock); the next run marks "
    "it failed"
)


def register_version(
    *,
    session: Session,
    version: str,
    path: str | Path,
    metrics: dict[str, Any] | None = None,
    status: ModelStatus = ModelStatus.CANDIDATE,
    parent_version: str | None = None,
    sha256: str | None = None,
) -> ModelVersion:
    """Record an artifact as a model version (sha256 computed from the file if not given)."""
    row = ModelVersion(
        version=version,
        path=str(path),
        sha256=sha256 or file_sha256(path),
        metrics=metrics or {},
        status=status,
        parent_version=parent_version,
        traffic_share=1.0 if status == ModelStatus.PRODUCTION else 0.0,
        promoted_at=db_time(session) if status == ModelStatus.PRODUCTION else None,
    )
    session.add(row)
    session.flush()
    return row


def get_version(*, session: Session, version: str) -> ModelVersion:
    """One version or NotFoundError."""
    row = session.get(ModelVersion, version)
    if row is None:
        raise NotFoundError(f"No model version {version!r}.")
    return row


def version_for_path(*, session: Session, path: Path) -> ModelVersion | None:
    """The version whose model file is `path`, if one is registered."""
    return session.scalars(
        select(ModelVersion).where(ModelVersion.path == str(path)).limit(1)
    ).first()


def record_runtime_agreement(
    *, session: Session, version: str, agreement: dict[str, dict[str, Any]], source: str
) -> ModelVersion:
    """Merge a new measure of `version`'s runtimes (`retrain.evaluate.runtime_agreement`) into
    its metrics: each measured runtime is listed under `faithful_runtimes` exactly when it was
    faithful this time, with this measure's converter fingerprint and `source`; the others keep
    theirs.
    Workers read it at their next load of the version."""
    row = session.get(ModelVersion, version, with_for_update=True)
    if row is None:
        raise NotFoundError(f"No model version {version!r}.")
    metrics = dict(row.metrics or {})
    kept = [k for k in metrics.get("faithful_runtimes") or () if k not in agreement]
    metrics["faithful_runtimes"] = kept + [k for k, v in agreement.items() if v["faithful"]]
    measured = {kind: {**result, "source": source} for kind, result in agreement.items()}
    metrics["runtime_agreement"] = {**(metrics.get("runtime_agreement") or {}), **measured}
    row.metrics = metrics
    session.flush()
    return row


def production_version(*, session: Session) -> ModelVersion | None:
    """The version marked production (the newest one if several were ever marked)."""
    return session.scalar(
        select(ModelVersion)
        .where(ModelVersion.status == ModelStatus.PRODUCTION)
        .order_by(ModelVersion.promoted_at.desc().nulls_last())
        .limit(1)
    )


def serving_versions(*, session: Session) -> list[ModelVersion]:
    """Production and canary versions, production first."""
    rows = session.scalars(
        select(ModelVersion).where(
            ModelVersion.status.in_([ModelStatus.PRODUCTION, ModelStatus.CANARY])
        )
    ).all()
    return sorted(rows, key=lambda r: r.status != ModelStatus.PRODUCTION)


def list_versions(*, session: Session) -> list[ModelVersion]:
    """Every version, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc())))


def recent_training_runs(*, session: Session, limit: int = 10) -> list[TrainingRun]:
    """The latest retraining runs, newest first (without their label ids: a trained run's
    list holds every label it used, and a listing needs only the counts)."""
    query = (
        select(TrainingRun)
        .options(defer(TrainingRun.feedback_ids))
        .order_by(TrainingRun.started_at.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def interrupted_runs(
    *, session: Session, settings: Settings, running: Iterable[uuid.UUID]
) -> set[uuid.UUID]:
    """Of the runs `running` (read as `running`), those whose process is gone: no process holds
    the retraining lock, and they still read `running` after that was seen. A run writes its
    end before it lets go of the lock, so one that ended between the first read and the check
    reads ended here; and a run started since marked them failed. A run's row only says
    `running` while its process lives to hold the lock, so without a holder nothing would
    ever end it (an OOM-killed maintenance worker) until the next run: `GET /v1/models`,
    `segsvc retrain runs` and `retrain log --follow` showed it running for ever."""
    ids = set(running)
    if not ids or retrain_lock_taken(settings, session):
        return set()
    still = select(TrainingRun.id).where(TrainingRun.id.in_(ids), TrainingRun.status == "running")
    return set(session.scalars(still))
