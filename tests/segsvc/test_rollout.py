"""Canary routing by a stable hash, promote/rollback/reject, and the automatic canary verdict."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from segsvc.db import session_scope
from segsvc.errors import ConflictError
from segsvc.migrate import upgrade
from segsvc.models import Job, JobStatus, ModelStatus, ModelVersion, utcnow
from segsvc.services import registry, rollout
from segsvc.settings import Settings


def test_routes_to_canary_respects_the_share_within_tolerance() -> None:
    ids = [uuid.uuid4() for _ in range(20_000)]
    for share in (0.05, 0.10, 0.5):
        hits = sum(rollout.routes_to_canary(i, share) for i in ids)
        # 5 standard deviations of a binomial: fails by chance about once in 3 million runs.
        tolerance = 5 * (len(ids) * share * (1 - share)) ** 0.5
        assert abs(hits - len(ids) * share) < tolerance, (share, hits)


def test_routes_to_canary_is_stable_and_nested() -> None:
    job = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert rollout.routes_to_canary(job, 0.3) == rollout.routes_to_canary(str(job).upper(), 0.3)
    assert rollout.canary_fraction(job) == rollout.canary_fraction(str(job))
    # Growing the share only adds jobs to the canary: nobody flips back and forth.
    ids = [uuid.uuid4() for _ in range(2000)]
    small = {i for i in ids if rollout.routes_to_canary(i, 0.1)}
    large = {i for i in ids if rollout.routes_to_canary(i, 0.2)}
    assert small <= large
    assert not any(rollout.routes_to_canary(i, 0.0) for i in ids)
    assert all(rollout.routes_to_canary(i, 1.0) for i in ids)


def add(settings: Settings, model_file: Path, version: str, status: ModelStatus) -> None:
    with session_scope(settings) as session:
        registry.register_version(
            session=session,
            version=version,
            path=model_file,
            status=status,
            parent_version="test-v1",
        )


def canary(settings: Settings, model_file: Path, version: str = "cand", share: float = 0.1) -> None:
    add(settings, model_file, version, ModelStatus.CANDIDATE)
    with session_scope(settings) as session:
        rollout.start_canary(session=session, version=version, share=share)


def statuses(settings: Settings) -> dict[str, tuple[str, float]]:
    with session_scope(settings) as session:
        rows = registry.list_versions(session=session)
        return {r.version: (r.status, r.traffic_share) for r in rows}


def add_jobs(
    settings: Settings,
    version: str | None,
    n: int,
    *,
    status: JobStatus = JobStatus.SUCCEEDED,
    total_ms: float = 50.0,
    predict_ms: float = 10.0,
    batch_size: int = 1,
    error_code: str | None = None,
) -> None:
    """Finished jobs created now, as a worker would have recorded them."""
    lost = None if status == JobStatus.SUCCEEDED else "worker_lost"
    now = utcnow()
    with session_scope(settings) as session:
        for _ in range(n):
            session.add(
                Job(
                    status=status,
                    model_version=version,
                    created_at=now,
                    completed_at=now + timedelta(milliseconds=total_ms),
                    predict_ms=predict_ms if status == JobStatus.SUCCEEDED else None,
                    batch_size=batch_size,
                    error_code=error_code or lost,
                    input_sha256="0" * 64,
                    input_content_type="image/png",
                    input_width=8,
                    input_height=8,
                )
            )


def decide(settings: Settings, min_jobs: int = 20) -> rollout.CanaryVerdict | None:
    with session_scope(settings) as session:
        return rollout.decide_canary(session=session, min_jobs=min_jobs, latency_ratio=1.2)


def test_start_canary_sets_share_and_supersedes_the_old_canary(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    canary(settings, model_file, "first", share=0.1)
    canary(settings, model_file, "second", share=0.25)
    got = statuses(settings)
    assert got["second"] == ("canary", 0.25)
    assert got["first"] == ("rejected", 0.0)
    assert got["test-v1"] == ("production", 1.0)


def test_canary_is_promoted_after_enough_good_jobs(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    canary(settings, model_file)
    add_jobs(settings, "test-v1", 100)
    add_jobs(settings, "cand", 19)
    assert decide(settings).outcome == "waiting"  # type: ignore[union-attr]
    assert statuses(settings)["cand"][0] == "canary"
    add_jobs(settings, "cand", 1)
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "promoted", verdict
    assert verdict.canary.jobs == 20
    assert verdict.production.jobs == 100
    got = statuses(settings)
    assert got["cand"] == ("production", 1.0)
    assert got["test-v1"] == ("archived", 0.0)
    with session_scope(settings) as session:
        assert registry.get_version(session=session, version="cand").parent_version == "test-v1"
    assert decide(settings) is None  # no canary left


def test_a_verdict_reads_only_the_newest_finished_jobs(
    settings: Settings, production_model: str, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: every 30 s check loaded every job finished since the canary started, without
    # bound while a canary starved of traffic kept waiting.
    monkeypatch.setattr(rollout, "ARM_ROWS_FLOOR", 0)
    assert rollout.arm_rows_limit(min_jobs=20, share=0.5) == 160
    canary(settings, model_file, share=0.5)
    add_jobs(settings, "cand", 300, status=JobStatus.FAILED)  # older: past the limit
    add_jobs(settings, "test-v1", 100)
    add_jobs(settings, "cand", 60)
    verdict = decide(settings)
    assert verdict is not None
    assert (verdict.canary.jobs, verdict.production.jobs) == (60, 100)
    assert verdict.outcome == "promoted", verdict


def test_canary_with_failures_is_rolled_back_to_rejected(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    canary(settings, model_file)
    add_jobs(settings, "test-v1", 100)
    add_jobs(settings, "cand", 18)
    add_jobs(settings, "cand", 2, status=JobStatus.FAILED)
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "rolled_back"
    assert "failure rate 10.0% > 0.0%" in verdict.reason
    got = statuses(settings)
    assert got["cand"] == ("rejected", 0.0)
    assert got["test-v1"] == ("production", 1.0)
    with session_scope(settings) as session:
        reason = registry.get_version(session=session, version="cand").reason
        assert "failure rate" in (reason or "")


def test_failures_caused_by_the_input_do_not_count_against_the_canary(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    """A malformed input or one whose result cannot be prepared fails on any model: five such
    uploads landing in the canary's share rolled back an equally good canary."""
    canary(settings, model_file)
    add_jobs(settings, "test-v1", 100)
    add_jobs(settings, "cand", 20)
    add_jobs(settings, None, 3, status=JobStatus.FAILED, error_code="poison_input")
    add_jobs(settings, "cand", 2, status=JobStatus.FAILED, error_code="postprocess_failed")
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "promoted", verdict
    assert verdict.canary.failed == verdict.production.failed == 0
    assert verdict.canary.input_failed + verdict.production.input_failed == 5


def lost_jobs(settings: Settings, n: int, *, share: float, to_canary: bool) -> None:
    """`n` jobs the reconciler ended poison_input (lost with their worker, at last alone: no
    model version), with ids that hash to the canary's arm or to production's."""
    now = utcnow()
    with session_scope(settings) as session:
        made = 0
        while made < n:
            job_id = uuid.uuid4()
            if rollout.routes_to_canary(job_id, share) != to_canary:
                continue
            made += 1
            session.add(
                Job(
                    id=job_id,
                    status=JobStatus.FAILED,
                    created_at=now,
                    completed_at=now + timedelta(milliseconds=50),
                    error_code="poison_input",
                    attempts=3,
                    input_sha256="0" * 64,
                    input_content_type="image/png",
                    input_width=8,
                    input_height=8,
                )
            )


def test_a_canary_whose_every_job_crashed_its_worker_is_rolled_back_not_promoted(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    """A canary whose runtime kills the worker ends each of its jobs poison_input (lost, sent
    again, lost, run alone, lost): those counted as the input's fault, so it reached its
    minimum with no failure and no latency to compare, and was promoted to serve everyone."""
    canary(settings, model_file, share=0.1)
    add_jobs(settings, "test-v1", 200)
    lost_jobs(settings, 25, share=0.1, to_canary=True)
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "rolled_back", verdict
    assert "poison_input" in verdict.reason
    assert "25 of 25 jobs" in verdict.reason
    assert statuses(settings)["cand"][0] == "rejected"


def test_a_canary_is_promoted_only_on_jobs_it_ran_to_a_result(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    """Jobs their input failed count toward no verdict: a canary waits for `min_jobs` jobs it
    ran to a result, however many inputs failed on it meanwhile."""
    canary(settings, model_file, share=0.1)
    add_jobs(settings, "test-v1", 200)
    add_jobs(settings, "cand", 15)
    add_jobs(settings, "cand", 8, status=JobStatus.FAILED, error_code="postprocess_failed")
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "waiting", verdict
    assert verdict.reason.startswith("15/20 jobs run to a result")
    add_jobs(settings, "cand", 5)
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "promoted", verdict


def test_a_failure_or_two_more_than_chance_allows_does_not_roll_back_a_canary(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    """One failed canary job among 50, none among production's 450, rolled the canary back;
    a difference that chance explains no longer does, a clear one still does."""
    canary(settings, model_file)
    add_jobs(settings, "test-v1", 450)
    add_jobs(settings, "cand", 49)
    add_jobs(settings, "cand", 1, status=JobStatus.FAILED)
    verdict = decide(settings, min_jobs=50)
    assert verdict is not None
    assert verdict.outcome == "promoted", verdict

    canary(settings, model_file, "second")
    add_jobs(settings, "cand", 450)  # production now
    add_jobs(settings, "cand", 5, status=JobStatus.FAILED)
    add_jobs(settings, "second", 45)
    add_jobs(settings, "second", 5, status=JobStatus.FAILED)
    verdict = decide(settings, min_jobs=50)
    assert verdict is not None
    assert verdict.outcome == "rolled_back", verdict
    assert "failure rate 10.0% > 1.1% (5 of 50 jobs; by chance p = 0.00" in verdict.reason


def test_excess_failure_p_value_is_the_one_sided_fisher_exact_test() -> None:
    def arm(jobs: int, failed: int) -> rollout.ArmStats:
        return rollout.ArmStats(jobs, failed, None, None)

    # 2 of both arms' 2 failures in the canary's 20 of 120 jobs: C(20,2) / C(120,2).
    assert rollout.excess_failure_p_value(arm(20, 2), arm(100, 0)) == pytest.approx(190 / 7140)
    assert rollout.excess_failure_p_value(arm(20, 1), arm(100, 0)) == pytest.approx(20 / 120)
    assert rollout.excess_failure_p_value(arm(20, 0), arm(100, 9)) == 1.0
    assert rollout.excess_failure_p_value(arm(20, 1), arm(0, 0)) == 0.0


def test_canary_that_is_slower_is_rolled_back(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    canary(settings, model_file)
    add_jobs(settings, "test-v1", 50, total_ms=50.0)
    add_jobs(settings, "cand", 20, total_ms=500.0)
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "rolled_back"
    assert "queue-to-complete" in verdict.reason


def test_canary_speed_is_compared_at_equal_batch_sizes(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    """A canary's share of a batch is small, so its forward passes are shorter: a canary 3x
    slower per pass at the sizes both arms ran is rolled back, though its median pass (small
    groups) is shorter than production's (whole batches)."""
    canary(settings, model_file)
    add_jobs(settings, "test-v1", 60, predict_ms=80.0, batch_size=8)
    add_jobs(settings, "test-v1", 20, predict_ms=10.0, batch_size=1)
    add_jobs(settings, "cand", 20, predict_ms=30.0, batch_size=1)
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "rolled_back", verdict
    assert "3.00 x production's at equal batch sizes" in verdict.reason


def test_canary_running_smaller_groups_is_not_taken_for_slower(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    canary(settings, model_file)
    add_jobs(settings, "test-v1", 60, predict_ms=80.0, batch_size=8)
    add_jobs(settings, "test-v1", 20, predict_ms=11.0, batch_size=1)
    add_jobs(settings, "cand", 20, predict_ms=12.0, batch_size=1)
    add_jobs(settings, "cand", 5, predict_ms=21.0, batch_size=2)  # production ran no pair
    verdict = decide(settings)
    assert verdict is not None
    assert verdict.outcome == "promoted", verdict


def test_failed_jobs_without_a_version_count_in_the_arm_their_id_hashes_to(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    canary(settings, model_file, share=1.0)  # every id hashes to the canary
    add_jobs(settings, "cand", 20)
    add_jobs(settings, None, 3, status=JobStatus.FAILED)
    verdict = decide(settings)
    assert verdict is not None
    assert (verdict.canary.jobs, verdict.canary.failed) == (23, 3)
    assert verdict.outcome == "rolled_back"


def test_rollback_restores_the_previous_production_and_stops_the_canary(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    add(settings, model_file, "v2", ModelStatus.CANDIDATE)
    with session_scope(settings) as session:
        rollout.promote(session=session, version="v2")
    canary(settings, model_file, "v3")
    with session_scope(settings) as session:
        restored = rollout.rollback(session=session, reason="bad masks")
        assert restored.version == "test-v1"
    got = statuses(settings)
    assert got["test-v1"] == ("production", 1.0)
    assert got["v2"] == ("rejected", 0.0)
    assert got["v3"] == ("rejected", 0.0)
    with session_scope(settings) as session:
        assert registry.get_version(session=session, version="v2").reason == "bad masks"
        assert len(registry.serving_versions(session=session)) == 1


def test_rollback_skips_archived_versions_whose_model_file_was_pruned(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    """The pruner deletes older archived versions' files: a rollback to such a parent made
    production a version no worker could load."""
    for version in ("v2", "v3"):
        add(settings, model_file, version, ModelStatus.CANDIDATE)
        with session_scope(settings) as session:
            rollout.promote(session=session, version=version)  # v3's parent is v2
    with session_scope(settings) as session:
        registry.get_version(session=session, version="v2").file_deleted_at = utcnow()
        restored = rollout.rollback(session=session)
        assert restored.version == "test-v1"  # the newest archived one with its file
    with session_scope(settings) as session:
        registry.get_version(session=session, version="test-v1").file_deleted_at = utcnow()
        with pytest.raises(ConflictError):  # nothing loadable to return to
            rollout.rollback(session=session)


def test_promoting_another_version_stops_the_canary_measured_against_the_old_one(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    """An operator moves production away from test-v1 while a canary gated against test-v1
    runs: the canary stops, so no verdict can promote it over the operator's choice."""
    canary(settings, model_file, "cand")
    add(settings, model_file, "hotfix", ModelStatus.CANDIDATE)
    with session_scope(settings) as session:
        rollout.promote(session=session, version="hotfix")
    got = statuses(settings)
    assert got["hotfix"] == ("production", 1.0)
    assert got["cand"] == ("rejected", 0.0)
    assert got["test-v1"] == ("archived", 0.0)
    with session_scope(settings) as session:
        assert registry.get_version(session=session, version="cand").reason == (
            "stopped by the promotion of hotfix"
        )
    add_jobs(settings, "hotfix", 100)
    add_jobs(settings, "cand", 50)
    assert decide(settings) is None  # no canary left to decide on
    assert statuses(settings)["hotfix"] == ("production", 1.0)


def test_reject_refuses_production_and_rollback_needs_history(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    with session_scope(settings) as session:
        with pytest.raises(ConflictError):
            rollout.reject(session=session, version="test-v1", reason="x")
        with pytest.raises(ConflictError):
            rollout.rollback(session=session)
    add(settings, model_file, "cand", ModelStatus.CANDIDATE)
    with session_scope(settings) as session:
        row = rollout.reject(session=session, version="cand", reason="gate: worse")
        assert isinstance(row, ModelVersion)
        assert (row.status, row.reason) == ("rejected", "gate: worse")


def test_a_version_whose_model_file_was_pruned_never_serves_again(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    add(settings, model_file, "pruned", ModelStatus.REJECTED)
    with session_scope(settings) as session:
        registry.get_version(session=session, version="pruned").file_deleted_at = utcnow()
    with session_scope(settings) as session:
        with pytest.raises(rollout.ModelFileDeletedError, match="pruned cannot serve again"):
            rollout.promote(session=session, version="pruned")
        with pytest.raises(rollout.ModelFileDeletedError):
            rollout.start_canary(session=session, version="pruned", share=0.1)
    got = statuses(settings)
    assert got["pruned"] == ("rejected", 0.0)
    assert got["test-v1"] == ("production", 1.0)


def test_a_verdict_never_promotes_a_canary_an_operator_rollback_just_stopped(
    settings: Settings, production_model: str, model_file: Path
) -> None:
    """The verdict runs while an operator's rollback is committing: it must see the rollback
    (the canary stopped) instead of promoting the canary it read a moment before."""
    import threading

    add(settings, model_file, "v2", ModelStatus.CANDIDATE)
    with session_scope(settings) as session:
        rollout.promote(session=session, version="v2")
    canary(settings, model_file)
    add_jobs(settings, "v2", 40)
    add_jobs(settings, "cand", 20)
    verdicts: list[rollout.CanaryVerdict | None] = []
    with session_scope(settings) as operator:
        rollout.rollback(session=operator)  # v2 and its canary stop; test-v1 serves again
        thread = threading.Thread(target=lambda: verdicts.append(decide(settings)))
        thread.start()
        thread.join(0.5)  # the verdict waits for the rollback to commit
        assert thread.is_alive()
    thread.join(10)
    assert verdicts == [None]  # no canary left to judge
    got = statuses(settings)
    assert got["test-v1"] == ("production", 1.0)
    assert got["cand"][0] == "rejected"
    assert got["v2"][0] == "rejected"


def test_the_registry_lock_serializes_changes_on_sqlite_too(tmp_path: Path) -> None:
    """The embedded dev mode (`make run` without a database URL): a second change of the
    registry waits for the first to commit, and then reads what it committed, so a canary
    verdict and an operator's promote cannot both leave a production."""
    cfg = Settings(var_dir=tmp_path, _env_file=None)
    upgrade(settings=cfg)
    second_locked_at: list[float] = []
    with session_scope(cfg) as first:
        rollout.lock_registry(first)

        def second_change() -> None:
            with session_scope(cfg) as second:
                rollout.lock_registry(second)
                second_locked_at.append(time.monotonic())

        waiter = threading.Thread(target=second_change)
        waiter.start()
        time.sleep(0.5)
        assert second_locked_at == []  # still waiting for the first change to commit
        committed_at = time.monotonic()
    waiter.join(10)
    assert second_locked_at
    assert second_locked_at[0] >= committed_at
