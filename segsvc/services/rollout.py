"""Rollout: canary routing by a stable hash, promote / rollback / reject, and the canary verdict."""

from __future__ import annotations

import hashlib
import math
import statistics
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from segsvc.errors import ConflictError
from segsvc.models import Job, JobStatus, ModelStatus, ModelVersion, db_time
from segsvc.services import registry


def canary_fraction(job_id: uuid.UUID | str) -> float:
    """A job id's stable position in [0, 1): the first 64 bits of sha256 of its canonical text."""
    text = str(uuid.UUID(str(job_id)))
    digest = hashlib.sha256(text.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def routes_to_canary(job_id: uuid.UUID | str, share: float) -> bool:
    """True when the job belongs to the canary's share of traffic (same answer everywhere)."""
    return share > 0 and canary_fraction(job_id) < share


# Any advisory-lock key works as long as every registry change uses the same one.
REGISTRY_LOCK_KEY = 0x5E65_0DE1
# A canary verdict reads at least this many of the newest finished jobs (see arm_rows_limit).
ARM_ROWS_FLOOR = 20_000
# Failures the user's input caused (a malformed stored input, one that crashes the worker, a
# result that cannot be prepared for its size): any model fails them alike, so they say nothing
# about the canary and are not compared.
INPUT_FAILURES = frozenset({"poison_input", "postprocess_failed"})
# A canary is failing more than production only when so many of the failures falling to it
# would happen by chance less often than this (one-sided Fisher exact test): one unlucky failure
# among 50 jobs is no evidence, and must not roll back an equally good canary.
FAILURE_P_VALUE = 0.05


class ModelFileDeletedError(ConflictError):
    """The version's model file was pruned (`segsvc.services.model_files`): it cannot serve."""

    code = "model_file_deleted"


def lock_registry(session: Session) -> None:
    """Serialize changes of which version serves (for this transaction), then read afresh.

    A canary verdict, an operator's promote or rollback, a worker rejecting a canary and a
    retraining run all read the registry and then change it; without this, a verdict that read
    the canary before an operator's rollback committed would promote the canary it stopped.
    Objects this session loaded before are expired, so what follows reads the locked state.
    """
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": REGISTRY_LOCK_KEY})
    else:
        # SQLite has one write lock, but pysqlite begins a transaction only at the first write,
        # so reads before it lock nothing: a write that changes no row takes the lock now (a
        # second writer waits for it, busy_timeout) and holds it to this transaction's end.
        session.execute(text("UPDATE model_versions SET status = status WHERE 0 = 1"))
    session.expire_all()


def canary_version(*, session: Session) -> ModelVersion | None:
    """The version in canary, if any (the newest if several)."""
    return session.scalar(
        select(ModelVersion)
        .where(ModelVersion.status == ModelStatus.CANARY)
        .order_by(ModelVersion.promoted_at.desc().nulls_last())
        .limit(1)
    )


def start_canary(*, session: Session, version: str, share: float) -> ModelVersion:
    """Serve `share` of jobs with `version`; a canary already running is superseded."""
    lock_registry(session)
    row = registry.get_version(session=session, version=version)
    _require_model_file(row)
    for other in _with_status(session, ModelStatus.CANARY):
        if other.version != version:
            _retire(session, other, ModelStatus.REJECTED, f"superseded by canary {version}")
    row.status = ModelStatus.CANARY
    row.traffic_share = share
    # The canary window starts here, on the clock the jobs' created_at it selects are on.
    row.promoted_at = db_time(session)
    row.reason = None
    session.flush()
    return row


# The reason a worker gives a canary it rejected because it could not load it
# (`worker.model_manager`): `promote` refuses such a version unless forced.
LOAD_FAILURE = "could not load"


def promote(
    *, session: Session, version: str, reason: str | None = None, force: bool = False
) -> ModelVersion:
    """Make `version` production at once; the old production is archived (kept for rollback).

    Any other canary stops (rejected, as in a rollback): it was gated and measured against
    the production this replaces, so its verdict would compare it with a version it was never
    evaluated against, and promote it over the operator's choice within minutes.

    A version a worker rejected because it could not load it is refused unless `force`:
    promoted, the running workers kept serving the old one while the registry named it, and
    every worker started after (a scale-up from zero) failed its first load."""
    lock_registry(session)
    row = registry.get_version(session=session, version=version)
    if row.status == ModelStatus.PRODUCTION:
        raise ConflictError(f"{version} is already production.")
    if not force and row.status == ModelStatus.REJECTED and LOAD_FAILURE in (row.reason or ""):
        raise ConflictError(
            f"{version} was rejected because a worker could not load it ({row.reason}); as "
            "production, no new worker could start. Promote it with force (`segsvc models "
            "promote --force`, `?force=true`) once that is fixed."
        )
    _require_model_file(row)
    old = registry.production_version(session=session)
    for canary in _with_status(session, ModelStatus.CANARY):
        if canary.version != version:
            _retire(session, canary, ModelStatus.REJECTED, f"stopped by the promotion of {version}")
    for prev in _with_status(session, ModelStatus.PRODUCTION):
        _retire(session, prev, ModelStatus.ARCHIVED, f"replaced by {version}")
    if old is not None:
        row.parent_version = old.version
    row.status = ModelStatus.PRODUCTION
    row.traffic_share = 1.0
    row.promoted_at = db_time(session)
    row.retired_at = None
    row.reason = reason
    session.flush()
    return row


def reject(*, session: Session, version: str, reason: str) -> ModelVersion:
    """Stop a candidate or canary from (ever) serving, keeping the reason."""
    lock_registry(session)
    row = registry.get_version(session=session, version=version)
    if row.status == ModelStatus.PRODUCTION:
        raise ConflictError(f"{version} is production; roll back instead.")
    _retire(session, row, ModelStatus.REJECTED, reason)
    session.flush()
    return row


def reject_by_operator(*, session: Session, version: str, reason: str) -> ModelVersion:
    """An operator's `reject` (`POST /v1/models/<version>/reject`, `segsvc models reject`): a
    canary stops serving (workers drop it at their next poll) with production untouched, a
    candidate or an archived version never serves again. A version already rejected is refused
    (ConflictError, its reason said) rather than rejected again: that would overwrite why it
    was (a worker's or the verdict's account) and restart its file's grace before pruning."""
    lock_registry(session)
    row = registry.get_version(session=session, version=version)
    if row.status == ModelStatus.REJECTED:
        raise ConflictError(f"{version} is already rejected: {row.reason or 'no reason kept'}")
    return reject(session=session, version=version, reason=reason)


def rollback(*, session: Session, reason: str = "rolled back by an operator") -> ModelVersion:
    """Restore the previous production version at once; the current one and any canary stop."""
    lock_registry(session)
    current = registry.production_version(session=session)
    if current is None:
        raise ConflictError("There is no production version to roll back.")
    previous = _previous_production(session, current)
    if previous is None:
        raise ConflictError(f"{current.version} has no earlier production version to return to.")
    for canary in _with_status(session, ModelStatus.CANARY):
        _retire(session, canary, ModelStatus.REJECTED, f"stopped by rollback of {current.version}")
    _retire(session, current, ModelStatus.REJECTED, reason)
    previous.status = ModelStatus.PRODUCTION
    previous.traffic_share = 1.0
    previous.promoted_at = db_time(session)
    previous.retired_at = None
    previous.reason = f"restored by rollback of {current.version}"
    session.flush()
    return previous


def retire_replaced_production(*, session: Session, current: ModelVersion, reason: str) -> None:
    """Production's file now holds other bytes (the shipped file replaced where it lies): its
    own are gone, so it is archived as a version whose file was deleted, never a rollback or
    promote target, and any canary stops, gated as it was against the weights it replaces."""
    for canary in _with_status(session, ModelStatus.CANARY):
        _retire(session, canary, ModelStatus.REJECTED, f"stopped: {reason}")
    _retire(session, current, ModelStatus.ARCHIVED, reason)
    current.file_deleted_at = db_time(session)
    session.flush()


def _previous_production(session: Session, current: ModelVersion) -> ModelVersion | None:
    """The parent, else the most recently retired production version: of those whose model
    file is still there (the pruner deletes older archived versions' files, and a version no
    worker can load must never become production)."""
    if current.parent_version:
        parent = session.get(ModelVersion, current.parent_version)
        if (
            parent is not None
            and parent.status == ModelStatus.ARCHIVED
            and parent.file_deleted_at is None
        ):
            return parent
    return session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.status == ModelStatus.ARCHIVED,
            ModelVersion.promoted_at.is_not(None),
            ModelVersion.file_deleted_at.is_(None),
        )
        .order_by(ModelVersion.retired_at.desc().nulls_last())
        .limit(1)
    )


def _require_model_file(row: ModelVersion) -> None:
    """Refuse a version whose file the pruner deleted: workers could never load it. (Read
    under `lock_registry`, which the pruner holds while it deletes and marks.)"""
    if row.file_deleted_at is not None:
        raise ModelFileDeletedError(
            f"{row.version} cannot serve again: its model file {row.path} was deleted on "
            f"{row.file_deleted_at:%Y-%m-%d %H:%M} UTC (rejected versions' files are pruned "
            "SEG_MODEL_FILE_GRACE_DAYS after their rejection)."
        )


def _with_status(session: Session, status: ModelStatus) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).where(ModelVersion.status == status)))


def _retire(session: Session, row: ModelVersion, status: ModelStatus, reason: str) -> None:
    row.status = status
    row.traffic_share = 0.0
    row.retired_at = db_time(session)
    row.reason = reason


# --- the automatic canary verdict ------------------------------------------------------------


@dataclass(frozen=True)
class ArmStats:
    """Outcomes of the jobs one version served in the canary window."""

    jobs: int
    failed: int  # failures the model may have caused (INPUT_FAILURES are not counted)
    p50_total_ms: float | None
    p50_predict_ms: float | None
    # Median forward-pass ms by the number of this version's jobs in the pass: a canary's
    # share of a batch is small, so only passes of equal size compare the models' speed.
    p50_predict_ms_by_size: dict[int, float] = field(default_factory=dict)
    input_failed: int = 0  # failures its input caused (INPUT_FAILURES), among `jobs`
    # Among `input_failed`: jobs no model finished that ended `poison_input` (lost with their
    # worker again and again, at last alone, or a malformed stored input). Inputs crash any
    # model alike, so these are compared by rate: a canary whose runtime kills the worker on
    # every job ends every job so, with no model failure and no latency to compare.
    crashed: int = 0

    @property
    def failure_rate(self) -> float:
        return self.failed / self.jobs if self.jobs else 0.0

    @property
    def crash_rate(self) -> float:
        return self.crashed / self.jobs if self.jobs else 0.0

    @property
    def with_result(self) -> int:
        """Jobs the version ran to a result (a mask, or a failure the model may have caused)."""
        return self.jobs - self.input_failed


@dataclass(frozen=True)
class CanaryVerdict:
    """What `decide_canary` did: `promoted`, `rolled_back` or `waiting`."""

    version: str
    outcome: str
    reason: str
    canary: ArmStats
    production: ArmStats

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def decide_canary(*, session: Session, min_jobs: int, latency_ratio: float) -> CanaryVerdict | None:
    """After `min_jobs` canary jobs: promote if failures and latency are no worse, else reject."""
    lock_registry(session)
    canary = canary_version(session=session)
    production = registry.production_version(session=session)
    if canary is None or production is None or canary.promoted_at is None:
        return None
    arms = arm_stats(
        session=session,
        since=canary.promoted_at,
        canary=canary.version,
        production=production.version,
        share=canary.traffic_share,
        limit=arm_rows_limit(min_jobs=min_jobs, share=canary.traffic_share),
    )
    ours, theirs = arms
    if ours.jobs < max(1, min_jobs):  # a verdict on no canary job at all would be no evidence
        return CanaryVerdict(canary.version, "waiting", f"{ours.jobs}/{min_jobs} jobs", *arms)
    problems = compare_arms(ours, theirs, latency_ratio=latency_ratio)
    if problems:
        reason = "canary worse than production: " + "; ".join(problems)
        _retire(session, canary, ModelStatus.REJECTED, reason)
        session.flush()
        return CanaryVerdict(canary.version, "rolled_back", reason, *arms)
    if ours.with_result < min_jobs:  # promoted on jobs it never ran to a result: no evidence
        return CanaryVerdict(
            canary.version,
            "waiting",
            f"{ours.with_result}/{min_jobs} jobs run to a result ({ours.input_failed} more "
            "failed by their input)",
            *arms,
        )
    reason = f"canary passed after {ours.jobs} jobs"
    promote(session=session, version=canary.version, reason=reason)
    return CanaryVerdict(canary.version, "promoted", reason, *arms)


def compare_arms(canary: ArmStats, production: ArmStats, *, latency_ratio: float) -> list[str]:
    """Why the canary is worse than production (empty when it is not)."""
    problems = []
    chance = excess_failure_p_value(canary, production)
    if canary.failure_rate > production.failure_rate and chance < FAILURE_P_VALUE:
        problems.append(
            f"failure rate {canary.failure_rate:.1%} > {production.failure_rate:.1%} "
            f"({canary.failed} of {canary.jobs} jobs; by chance p = {chance:.3f} < "
            f"{FAILURE_P_VALUE:g}; failures caused by the input not counted)"
        )
    lost = _excess_p_value(canary.crashed, canary.jobs, production.crashed, production.jobs)
    if canary.crash_rate > production.crash_rate and lost < FAILURE_P_VALUE:
        problems.append(
            f"jobs ended poison_input (their worker lost with them, or a malformed input) "
            f"{canary.crash_rate:.1%} > {production.crash_rate:.1%} ({canary.crashed} of "
            f"{canary.jobs} jobs; by chance p = {lost:.3f} < {FAILURE_P_VALUE:g})"
        )
    ours, theirs = canary.p50_total_ms, production.p50_total_ms
    if ours is not None and theirs is not None and ours > theirs * latency_ratio:
        problems.append(
            f"p50 queue-to-complete {ours:.0f} ms > {latency_ratio:g} x {theirs:.0f} ms"
        )
    mine, other = canary.p50_predict_ms_by_size, production.p50_predict_ms_by_size
    ratios = [mine[n] / other[n] for n in sorted(mine) if other.get(n, 0) > 0]
    if ratios and statistics.median(ratios) > latency_ratio:
        problems.append(
            f"forward passes {statistics.median(ratios):.2f} x production's at equal batch "
            f"sizes (> {latency_ratio:g})"
        )
    return problems


def excess_failure_p_value(canary: ArmStats, production: ArmStats) -> float:
    """How likely the canary gets at least its share of both arms' failures if both versions
    fail alike: the one-sided Fisher exact test (hypergeometric tail, in log space)."""
    return _excess_p_value(canary.failed, canary.jobs, production.failed, production.jobs)


def _excess_p_value(k_c: int, n_c: int, k_p: int, n_p: int) -> float:
    """The one-sided Fisher exact test of `k_c` of `n_c` canary jobs against `k_p` of `n_p`."""
    failures = k_c + k_p
    if k_c == 0:
        return 1.0
    if n_p == 0:  # production ran nothing to compare with: every failure counts
        return 0.0

    def log_comb(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    total = log_comb(n_c + n_p, failures)
    tail = [
        log_comb(n_c, k) + log_comb(n_p, failures - k) - total
        for k in range(k_c, min(failures, n_c) + 1)
        if failures - k <= n_p
    ]
    return min(1.0, sum(math.exp(t) for t in tail))


def arm_rows_limit(*, min_jobs: int, share: float) -> int:
    """How many of the newest finished jobs a verdict reads: enough for `min_jobs` canary jobs
    several times over, so a canary starved of traffic is not re-read in full every check."""
    return max(ARM_ROWS_FLOOR, math.ceil(4 * max(min_jobs, 1) / max(share, 1e-6)))


def arm_stats(
    *,
    session: Session,
    since: datetime,
    canary: str,
    production: str,
    share: float,
    limit: int | None = None,
) -> tuple[ArmStats, ArmStats]:
    """The newest `limit` finished jobs created since the canary started, split into canary
    and production arms.

    A succeeded job belongs to the version that served it, and so does a failed one that a
    model ran (a post-processing failure carries its version). One no model finished (a worker
    lost with it, a malformed stored input) carries none, so it goes to the arm its id hashes
    to.
    """
    # One query per status, each walking ix_jobs_status_created_at backwards and stopping at
    # `limit` (an IN over both statuses read every job since `since` and sorted them); the
    # newest `limit` of the two then.
    rows: list[Any] = []
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        rows += session.execute(
            select(Job.id, Job.status, Job.model_version, Job.created_at, Job.completed_at,
                   Job.predict_ms, Job.batch_size, Job.error_code)
            .where(Job.status == status, Job.created_at >= since)
            .order_by(Job.created_at.desc())
            .limit(limit)
        ).all()  # fmt: skip
    if limit is not None:
        rows = sorted(rows, key=lambda row: row.created_at, reverse=True)[:limit]
    arms: dict[str, list[Any]] = {canary: [], production: []}
    for row in rows:
        version = row.model_version
        if version is None and row.status == JobStatus.FAILED:
            version = canary if routes_to_canary(row.id, share) else production
        if version in arms:
            arms[version].append(row)
    return _summarize(arms[canary]), _summarize(arms[production])


def _summarize(rows: list[Any]) -> ArmStats:
    ok = [r for r in rows if r.status == JobStatus.SUCCEEDED]
    by_input = sum(r.status != JobStatus.SUCCEEDED and r.error_code in INPUT_FAILURES for r in rows)
    crashed = sum(
        r.status != JobStatus.SUCCEEDED and r.error_code == "poison_input" and not r.model_version
        for r in rows
    )
    totals = [
        (r.completed_at - r.created_at).total_seconds() * 1000.0 for r in ok if r.completed_at
    ]
    predicts = [r.predict_ms for r in ok if r.predict_ms is not None]
    by_size: dict[int, list[float]] = {}
    for r in ok:
        if r.predict_ms is not None:
            by_size.setdefault(r.batch_size or 1, []).append(r.predict_ms)
    return ArmStats(
        jobs=len(rows),
        failed=len(rows) - len(ok) - by_input,
        p50_total_ms=statistics.median(totals) if totals else None,
        p50_predict_ms=statistics.median(predicts) if predicts else None,
        p50_predict_ms_by_size={n: statistics.median(v) for n, v in by_size.items()},
        input_failed=by_input,
        crashed=crashed,
    )
