"""/v1/models: the registry for operators (admin keys only): list, promote, roll back, and
reject a canary (or a candidate) without touching production."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, request, send_file

from api.auth import authenticate_request, require_admin
from api.context import db, settings
from segsvc.errors import NotFoundError, ValidationError
from segsvc.models import ModelVersion, TrainingRun
from segsvc.serialize import iso
from segsvc.services import registry, rollout
from segsvc.services.model_files import CANDIDATE

bp = Blueprint("models", __name__, url_prefix="/v1/models")
RECENT_RUNS = 10


@bp.before_request
def _admins_only() -> None:
    """Every registry operation needs an admin key (403 otherwise)."""
    authenticate_request()
    require_admin()


@bp.get("")
def list_models() -> Response:
    """Every version with status, traffic share and metrics, plus the recent training runs."""
    session = db()
    runs = registry.recent_training_runs(session=session, limit=RECENT_RUNS)
    gone = registry.interrupted_runs(
        session=session, settings=settings(), running=[r.id for r in runs if r.status == "running"]
    )
    return jsonify(
        {
            "versions": [version_body(v) for v in registry.list_versions(session=session)],
            "training_runs": [run_body(r, interrupted=r.id in gone) for r in runs],
        }
    )


@bp.post("/<version>/promote")
def promote_model(version: str) -> Response:
    """Make a version production now; the old one is archived and can be rolled back to.
    `?force=true` promotes one a worker rejected because it could not load it."""
    raw = request.args.get("force", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ValidationError("force must be true or false.")
    session = db()
    row = rollout.promote(
        session=session,
        version=version,
        reason="promoted by an operator",
        force=raw in ("true", "1"),
    )
    session.commit()
    return jsonify(version_body(row))


@bp.post("/<version>/reject")
def reject_model(version: str) -> Response:
    """Reject a version now: a canary stops serving, production untouched.

    A rollback would also retire a healthy production. Workers drop a rejected canary at their
    next poll. Under the registry lock, as promote and rollback are; production is refused
    (409: roll back instead), and so is a version already rejected
    (`rollout.reject_by_operator`)."""
    session = db()
    row = rollout.reject_by_operator(
        session=session, version=version, reason="rejected by an operator"
    )
    session.commit()
    return jsonify(version_body(row))


@bp.get("/<version>/comparison.png")
def comparison_sheet(version: str) -> Response:
    """The sheet the retraining run that made `version` drew: photo | truth | production |
    candidate on the evaluation photos where the two disagree most (`retrain.pipeline`)."""
    row = registry.get_version(session=db(), version=version)
    path = comparison_path(row)
    if path is None:
        raise NotFoundError(
            f"No comparison sheet for {version}: retraining runs draw one for their candidate, "
            "and it goes when the version's files are pruned."
        )
    response = send_file(path, mimetype="image/png", max_age=0)
    response.headers["Cache-Control"] = "private, no-store"
    return response


def comparison_path(row: ModelVersion) -> Path | None:
    """The version's comparison sheet, when it has one: a plain `ft-...png` file name in its
    metrics, beside its model file (never a path elsewhere, whatever the metrics say)."""
    name = (row.metrics or {}).get("comparison_sheet")
    if not isinstance(name, str) or not CANDIDATE.fullmatch(name) or not name.endswith(".png"):
        return None
    path = Path(row.path).parent / name
    return path if path.is_file() else None


@bp.post("/rollback")
def rollback_model() -> Response:
    """Return to the previous production version now (the current one and any canary stop)."""
    session = db()
    row = rollout.rollback(session=session)
    session.commit()
    return jsonify(version_body(row))


def version_body(row: ModelVersion) -> dict[str, Any]:
    """A model version as the API returns it."""
    return {
        "version": row.version,
        "status": row.status,
        "traffic_share": row.traffic_share,
        "metrics": row.metrics,
        "parent_version": row.parent_version,
        "reason": row.reason,
        "sha256": row.sha256,
        "created_at": iso(row.created_at),
        "promoted_at": iso(row.promoted_at),
        "retired_at": iso(row.retired_at),
        "file_deleted_at": iso(row.file_deleted_at),
        "urls": {  # the sheet while it is there (it goes when the version's files are pruned)
            "comparison": f"/v1/models/{row.version}/comparison.png"
            if comparison_path(row) is not None
            else None
        },
    }


# The last lines of a run's log in its summary: a running run's progress (its phase, the
# latest epoch's loss and time), a finished one's verdict; `segsvc retrain log` prints it all.
LOG_TAIL_LINES = 8


def run_body(run: TrainingRun, *, interrupted: bool = False) -> dict[str, Any]:
    """A training run's summary, with the tail of its log (stored while it runs).
    `interrupted`: its row says `running` but its process is gone
    (`registry.interrupted_runs`): shown so, its row left for the next run to end."""
    return {
        "id": str(run.id),
        "status": registry.INTERRUPTED if interrupted else run.status,
        "trigger": run.trigger,
        "reason": registry.INTERRUPTED_REASON if interrupted else run.reason,
        "started_at": iso(run.started_at),
        "duration_s": run.duration_s,
        "labels": (run.data_counts or {}).get("labels", 0),
        "data_counts": run.data_counts,
        "production_version": run.production_version,
        "candidate_version": run.candidate_version,
        "production_mean_iou": (run.production_metrics or {}).get("mean_iou"),
        "candidate_mean_iou": (run.candidate_metrics or {}).get("mean_iou"),
        "log_tail": (run.log or "").splitlines()[-LOG_TAIL_LINES:],
    }
