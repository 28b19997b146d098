"""/v1/models: listing, promotion, rollback and rejection for admins; 403 for everyone else."""

from __future__ import annotations

import uuid
from pathlib import Path

from segsvc.db import session_scope
from segsvc.models import ModelStatus, TrainingRun, utcnow
from segsvc.retrain_lock import retrain_lock
from segsvc.services import registry, rollout
from segsvc.settings import Settings


def admin(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def add_version(
    settings: Settings, model_file: Path, version: str, status: ModelStatus = ModelStatus.CANDIDATE
) -> None:
    with session_scope(settings) as session:
        registry.register_version(
            session=session,
            version=version,
            path=model_file,
            status=status,
            metrics={"mean_iou": 0.5},
            parent_version="test-v1",
        )


def test_models_are_admin_only(client, auth, production_model: str) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/v1/models", headers=auth).status_code == 403
    assert client.post("/v1/models/test-v1/promote", headers=auth).status_code == 403
    assert client.post("/v1/models/test-v1/reject", headers=auth).status_code == 403
    resp = client.post("/v1/models/rollback", headers=auth)
    assert resp.status_code == 403
    assert resp.get_json()["error"] == "forbidden"
    assert client.get("/v1/models").status_code == 401


def test_models_list_shows_status_share_and_metrics(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings, model_file: Path
) -> None:
    add_version(settings, model_file, "cand-1")
    body = client.get("/v1/models", headers=admin(admin_key)).get_json()
    by_version = {v["version"]: v for v in body["versions"]}
    assert by_version["test-v1"]["status"] == "production"
    assert by_version["test-v1"]["traffic_share"] == 1.0
    assert by_version["cand-1"]["status"] == "candidate"
    assert by_version["cand-1"]["metrics"] == {"mean_iou": 0.5}
    assert body["training_runs"] == []


def test_promote_then_rollback_returns_to_the_previous_version(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings, model_file: Path
) -> None:
    add_version(settings, model_file, "cand-1")
    resp = client.post("/v1/models/cand-1/promote", headers=admin(admin_key))
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["status"] == "production"
    assert resp.get_json()["parent_version"] == "test-v1"
    listed = {
        v["version"]: v
        for v in client.get("/v1/models", headers=admin(admin_key)).get_json()["versions"]
    }
    assert listed["test-v1"]["status"] == "archived"
    assert listed["test-v1"]["traffic_share"] == 0.0

    back = client.post("/v1/models/rollback", headers=admin(admin_key))
    assert back.status_code == 200
    assert back.get_json()["version"] == "test-v1"
    assert back.get_json()["status"] == "production"
    listed = {
        v["version"]: v
        for v in client.get("/v1/models", headers=admin(admin_key)).get_json()["versions"]
    }
    assert listed["cand-1"]["status"] == "rejected"
    assert "rolled back" in listed["cand-1"]["reason"]


def test_promote_unknown_or_current_version_and_rollback_without_history(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str
) -> None:
    assert client.post("/v1/models/nope/promote", headers=admin(admin_key)).status_code == 404
    assert client.post("/v1/models/test-v1/promote", headers=admin(admin_key)).status_code == 409
    resp = client.post("/v1/models/rollback", headers=admin(admin_key))
    assert resp.status_code == 409
    assert "no earlier production" in resp.get_json()["message"]


def test_promote_of_a_version_whose_model_file_was_pruned_is_a_conflict(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings, model_file: Path
) -> None:
    add_version(settings, model_file, "pruned", ModelStatus.REJECTED)
    with session_scope(settings) as session:
        registry.get_version(session=session, version="pruned").file_deleted_at = utcnow()
    resp = client.post("/v1/models/pruned/promote", headers=admin(admin_key))
    assert resp.status_code == 409
    assert resp.get_json()["error"] == "model_file_deleted"
    body = client.get("/v1/models", headers=admin(admin_key)).get_json()
    by_version = {v["version"]: v for v in body["versions"]}
    assert by_version["pruned"]["file_deleted_at"] is not None
    assert by_version["pruned"]["status"] == "rejected"
    assert by_version["test-v1"]["file_deleted_at"] is None


def test_a_comparison_sheet_is_listed_and_served_only_while_it_is_there(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings, tmp_path: Path
) -> None:
    """Once the pruner deleted a version's files, its listing still gave the sheet's URL,
    which answered 404."""
    candidate = tmp_path / "ft-20261127-120000-abcdef.keras"
    candidate.write_bytes(b"model")
    sheet = candidate.with_suffix(".png")
    sheet.write_bytes(b"\x89PNG\r\n\x1a\nsheet")
    with session_scope(settings) as session:
        registry.register_version(
            session=session,
            version="ft-1",
            path=candidate,
            status=ModelStatus.REJECTED,
            metrics={"mean_iou": 0.5, "comparison_sheet": sheet.name},
        )

    def listed() -> object:
        body = client.get("/v1/models", headers=admin(admin_key)).get_json()
        return {v["version"]: v["urls"]["comparison"] for v in body["versions"]}["ft-1"]

    assert listed() == "/v1/models/ft-1/comparison.png"
    shown = client.get("/v1/models/ft-1/comparison.png", headers=admin(admin_key))
    assert (shown.status_code, shown.data) == (200, sheet.read_bytes())
    sheet.unlink()  # pruned with the candidate
    assert listed() is None
    gone = client.get("/v1/models/ft-1/comparison.png", headers=admin(admin_key))
    assert (gone.status_code, gone.get_json()["error"]) == (404, "not_found")


def test_reject_stops_a_canary_and_leaves_production_serving(  # type: ignore[no-untyped-def]
    client, auth, admin_key: str, production_model: str, settings: Settings, model_file: Path
) -> None:
    """Only promote and rollback existed: a bad canary could be stopped only by rolling back
    a healthy production with it."""
    add_version(settings, model_file, "cand-1")
    with session_scope(settings) as session:
        rollout.start_canary(session=session, version="cand-1", share=0.2)
    assert client.post("/v1/models/cand-1/reject", headers=auth).status_code == 403  # not admin
    with session_scope(settings) as session:
        assert registry.get_version(session=session, version="cand-1").status == "canary"
    resp = client.post("/v1/models/cand-1/reject", headers=admin(admin_key))
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert (body["version"], body["status"], body["traffic_share"]) == ("cand-1", "rejected", 0.0)
    assert body["reason"] == "rejected by an operator"
    listed = {
        v["version"]: v
        for v in client.get("/v1/models", headers=admin(admin_key)).get_json()["versions"]
    }
    assert (listed["test-v1"]["status"], listed["test-v1"]["traffic_share"]) == (
        "production",
        1.0,
    )
    assert listed["cand-1"]["status"] == "rejected"


def test_reject_refuses_production_an_unknown_or_a_rejected_version(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings, model_file: Path
) -> None:
    missing = client.post("/v1/models/nope/reject", headers=admin(admin_key))
    assert missing.status_code == 404
    assert missing.get_json()["error"] == "not_found"
    current = client.post("/v1/models/test-v1/reject", headers=admin(admin_key))
    assert current.status_code == 409
    assert current.get_json()["error"] == "conflict"
    assert "roll back instead" in current.get_json()["message"]
    add_version(settings, model_file, "bad", ModelStatus.CANDIDATE)
    with session_scope(settings) as session:
        rollout.reject(session=session, version="bad", reason="failed at inference: boom")
    again = client.post("/v1/models/bad/reject", headers=admin(admin_key))
    assert again.status_code == 409
    assert "already rejected: failed at inference: boom" in again.get_json()["message"]
    with session_scope(settings) as session:  # its first reason kept
        row = registry.get_version(session=session, version="bad")
        assert row.reason == "failed at inference: boom"
        assert registry.get_version(session=session, version="test-v1").status == "production"


def add_running_run(settings: Settings) -> str:
    run_id = uuid.uuid4()
    with session_scope(settings) as session:
        session.add(
            TrainingRun(
                id=run_id,
                status="running",
                trigger="schedule",
                started_at=utcnow(),
                log="snapshot: 7 labels\nepoch 1/3 (5 s): loss 0.5\n",
                data_counts={"labels": 7},
            )
        )
    return str(run_id)


def test_a_running_run_whose_process_died_is_listed_interrupted(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings
) -> None:
    """A run whose process died (an OOM-killed maintenance worker) was listed `running` until
    the next run's start marked it failed: nothing holds the retraining lock for it."""
    run_id = add_running_run(settings)
    [run] = client.get("/v1/models", headers=admin(admin_key)).get_json()["training_runs"]
    assert run["id"] == run_id
    assert run["status"] == "interrupted"
    assert "the process running it ended" in run["reason"]
    assert run["log_tail"][-1] == "epoch 1/3 (5 s): loss 0.5"
    with session_scope(settings) as session:  # shown so, the row left for the next run
        assert session.get(TrainingRun, uuid.UUID(run_id)).status == "running"  # type: ignore[union-attr]


def test_a_running_run_whose_process_holds_the_lock_is_listed_running(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings
) -> None:
    run_id = add_running_run(settings)
    with retrain_lock(settings) as held:  # its process, on a connection of its own
        assert held
        [run] = client.get("/v1/models", headers=admin(admin_key)).get_json()["training_runs"]
    assert (run["id"], run["status"], run["reason"]) == (run_id, "running", None)


def test_promote_of_a_version_no_worker_could_load_needs_force(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings, model_file: Path
) -> None:
    """Promoted, the registry named it while running workers kept the old one, and every worker
    started after failed its first load (a scale-up from zero served nothing)."""
    add_version(settings, model_file, "cand-1")
    with session_scope(settings) as session:
        rollout.start_canary(session=session, version="cand-1", share=0.1)
        rollout.reject(
            session=session,
            version="cand-1",
            reason=f"canary rolled back by worker w1: {rollout.LOAD_FAILURE} (3 tries): boom",
        )
    resp = client.post("/v1/models/cand-1/promote", headers=admin(admin_key))
    assert resp.status_code == 409
    assert "could not load it" in resp.get_json()["message"]
    assert "--force" in resp.get_json()["message"]
    bad = client.post("/v1/models/cand-1/promote?force=maybe", headers=admin(admin_key))
    assert bad.status_code == 422
    forced = client.post("/v1/models/cand-1/promote?force=true", headers=admin(admin_key))
    assert forced.status_code == 200, forced.get_json()
    assert forced.get_json()["status"] == "production"


def test_a_version_the_gate_rejected_can_still_be_promoted(  # type: ignore[no-untyped-def]
    client, admin_key: str, production_model: str, settings: Settings, model_file: Path
) -> None:
    """An operator may overrule the gate: only a failure to load needs force."""
    add_version(settings, model_file, "cand-1")
    with session_scope(settings) as session:
        rollout.reject(session=session, version="cand-1", reason="gate: mIoU 0.40 < 0.45")
    resp = client.post("/v1/models/cand-1/promote", headers=admin(admin_key))
    assert resp.status_code == 200, resp.get_json()
