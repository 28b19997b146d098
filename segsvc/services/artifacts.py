"""Which converted artifacts the cache keeps: those of the versions the registry may serve."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from segsvc.db import session_scope
from segsvc.ml.artifact_cache import PruneResult, prune_artifacts
from segsvc.models import ModelStatus, ModelVersion
from segsvc.services import registry
from segsvc.settings import Settings


def retained_sha256s(*, session: Session, keep_archived: int) -> set[str]:
    """The sha256s of production, the canary, production's rollback target and the
    `keep_archived` most recently retired production versions (later rollbacks' targets)."""
    rows = registry.serving_versions(session=session)
    production = registry.production_version(session=session)
    if production is not None and production.parent_version:
        # `rollout.rollback` returns to the parent first, however long ago it was retired.
        parent = session.get(ModelVersion, production.parent_version)
        if parent is not None and parent.status == ModelStatus.ARCHIVED:
            rows.append(parent)
    rows += session.scalars(
        select(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ARCHIVED, ModelVersion.promoted_at.is_not(None))
        .order_by(ModelVersion.retired_at.desc().nulls_last())
        .limit(keep_archived)
    )
    return {row.sha256 for row in rows}


def prune_artifact_cache(
    settings: Settings, *, dry_run: bool = False, older_than_s: float | None = None
) -> PruneResult:
    """Prune `settings.artifact_dir` of what no version the registry may serve needs, once
    unused for `older_than_s` (default `artifact_grace_hours`); see `segsvc.ml.artifact_cache`."""
    with session_scope(settings) as session:  # read before the folders are listed
        keep = retained_sha256s(session=session, keep_archived=settings.artifact_keep_archived)
    if older_than_s is None:
        older_than_s = settings.artifact_grace_hours * 3600
    return prune_artifacts(
        settings.artifact_dir, keep=keep, older_than_s=older_than_s, dry_run=dry_run
    )
