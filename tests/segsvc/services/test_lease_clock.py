"""Leases are granted and judged on Postgres' clock: a host whose clock is hours off neither
takes over a live job nor keeps a dead one (segsvc/services/jobs.py and reconcile.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update

from segsvc import models
from segsvc.db import session_scope
from segsvc.migrate import upgrade
from segsvc.models import Job
from segsvc.services import jobs as job_service
from segsvc.services import reconcile as reconcile_service
from segsvc.settings import Settings
from tests.conftest import db_clock
from tests.worker.test_reconciler import get, make_job

pytestmark = pytest.mark.timeout(60)

SKEW = timedelta(hours=3)  # far more than a lease (120 s by default)


def leased_job(settings: Settings, *, expires_in_s: float, attempts: int = 1) -> uuid.UUID:
    """A running job whose lease ends `expires_in_s` from now on Postgres' clock."""
    job_id = make_job(settings, status="running", attempts=attempts, lease_token=uuid.uuid4())
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=text("statement_timestamp() + make_interval(secs => :s)")),
            {"s": expires_in_s},
        )
    return job_id


def claim(settings: Settings, job_id: uuid.UUID) -> list[job_service.Claimed]:
    with session_scope(settings) as session:
        return job_service.claim_jobs(session=session, job_ids=[job_id], lease_seconds=60)


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_claim_leases_on_the_database_clock(
    settings: Settings, skew_clock: Callable[[timedelta], None], offset: timedelta
) -> None:
    job_id = make_job(settings)
    skew_clock(offset)
    before = db_clock(settings)
    (claimed,) = claim(settings, job_id)
    after = db_clock(settings)
    job = get(settings, job_id)
    assert job.lease_expires_at is not None
    assert before + timedelta(seconds=60) <= job.lease_expires_at <= after + timedelta(seconds=60)
    assert job.started_at is not None
    assert before <= claimed.started_at == job.started_at <= after


def test_claim_with_a_fast_clock_does_not_take_over_a_live_lease(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    live = leased_job(settings, expires_in_s=60)
    skew_clock(SKEW)  # this host believes the lease ran out hours ago
    assert claim(settings, live) == []
    assert get(settings, live).attempts == 1


def test_claim_with_a_slow_clock_takes_over_an_expired_lease(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    dead = leased_job(settings, expires_in_s=-5)
    skew_clock(-SKEW)  # this host believes the lease has hours left
    (claimed,) = claim(settings, dead)
    assert claimed.attempts == 2


def test_release_with_a_fast_clock_does_not_give_up_on_a_new_failure(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    # Released for the first time seconds ago (on Postgres' clock), the job is one release
    # from the limit: it gives up only once the first release is RELEASE_GIVE_UP_S old.
    job_id = make_job(settings)
    (claimed,) = claim(settings, job_id)
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                releases=job_service.MAX_RELEASES - 1,
                attempts=Job.attempts + job_service.MAX_RELEASES - 1,
                first_released_at=text("statement_timestamp() - interval '10 seconds'"),
            )
        )
    skew_clock(SKEW)
    with session_scope(settings) as session:
        assert job_service.release_job(
            session=session, job_id=job_id, lease_token=claimed.lease_token
        )
    assert get(settings, job_id).status == "queued"


def reconcile(settings: Settings) -> tuple[reconcile_service.ReconcileReport, list[uuid.UUID]]:
    sent: list[uuid.UUID] = []
    with session_scope(settings) as session:
        report = reconcile_service.reconcile(
            session=session, settings=settings, present=None, enqueue=sent.append
        )
    return report, sent


def test_reconcile_with_a_fast_clock_leaves_a_live_lease(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    live = leased_job(settings, expires_in_s=60)
    # A suspect still running: lost twice, then claimed (its current run is the third).
    suspect = leased_job(settings, expires_in_s=60, attempts=3)
    waiting = leased_job(settings, expires_in_s=-5, attempts=2)
    skew_clock(SKEW)
    report, sent = reconcile(settings)
    assert (report.requeued_lost, report.waiting_suspects, sent) == (0, 1, [])
    assert (get(settings, live).status, get(settings, suspect).status) == ("running", "running")
    assert get(settings, waiting).status == "running"  # waits for the live suspect


def test_reconcile_with_a_slow_clock_requeues_an_expired_lease(
    settings: Settings, skew_clock: Callable[[timedelta], None]
) -> None:
    dead = leased_job(settings, expires_in_s=-5)
    skew_clock(-SKEW)
    report, sent = reconcile(settings)
    assert (report.requeued_lost, sent) == (1, [dead])
    assert get(settings, dead).status == "queued"


def test_leases_on_sqlite_use_this_hosts_clock(tmp_path: Path) -> None:
    """SQLite (the embedded dev mode) has no clock of its own: claims, releases and passes
    still work on this host's."""
    cfg = Settings(var_dir=tmp_path, _env_file=None)
    upgrade(settings=cfg)
    job_id = make_job(cfg)
    (claimed,) = claim(cfg, job_id)
    job = get(cfg, job_id)
    assert job.lease_expires_at is not None
    assert job.started_at is not None
    lease = job.lease_expires_at - job.started_at
    assert lease == pytest.approx(timedelta(seconds=60), abs=timedelta(seconds=1))
    assert claimed.started_at == job.started_at
    with session_scope(cfg) as session:
        assert job_service.release_job(
            session=session, job_id=job_id, lease_token=claimed.lease_token
        )
    (claimed,) = claim(cfg, job_id)
    with session_scope(cfg) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=models.utcnow() - timedelta(seconds=1))
        )
    report, sent = reconcile(cfg)
    assert (report.requeued_lost, sent) == (1, [job_id])
