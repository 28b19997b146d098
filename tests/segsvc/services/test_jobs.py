"""segsvc/services/jobs.py on real Postgres: races between a client's cancel and a worker."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from segsvc.db import session_scope
from segsvc.errors import ConflictError
from segsvc.models import Job, JobStatus, WebhookMessage, utcnow
from segsvc.services import jobs as job_service
from segsvc.settings import Settings
from segsvc.webhooks.outbox import JOB_COMPLETED
from tests.worker.test_reconciler import inputs_kept, result
from tests.worker.test_segmenter import make_jobs

pytestmark = pytest.mark.timeout(60)


def cancel_in_thread(settings: Settings, job_id: uuid.UUID) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def cancel() -> None:
        try:
            with session_scope(settings) as session:
                job = job_service.cancel_job(session=session, job_id=str(job_id), client_id=None)
                outcome.append(job.status)
        except ConflictError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=cancel)
    return thread, outcome


def status(settings: Settings, job_id: uuid.UUID) -> tuple[str, bool]:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status, job.cancel_requested


def test_a_cancel_racing_a_claim_does_not_overwrite_the_running_job(settings: Settings) -> None:
    """The client's cancel reads the job while a worker's claim is still uncommitted: once the
    claim commits, the job is running, so the cancel only asks it to stop."""
    (job_id,) = make_jobs(settings, 1)
    with session_scope(settings) as worker:
        assert job_service.claim_jobs(session=worker, job_ids=[job_id], lease_seconds=60)
        thread, outcome = cancel_in_thread(settings, job_id)
        thread.start()
        thread.join(0.5)  # the cancel waits for the claim's row lock
        assert thread.is_alive()
    thread.join(10)
    assert outcome == [JobStatus.RUNNING]
    assert status(settings, job_id) == (JobStatus.RUNNING, True)


def test_a_cancel_racing_a_result_is_a_conflict(settings: Settings) -> None:
    (job_id,) = make_jobs(settings, 1)
    with session_scope(settings) as session:
        (claimed,) = job_service.claim_jobs(session=session, job_ids=[job_id], lease_seconds=60)
    with session_scope(settings) as worker:
        worker.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_token == claimed.lease_token)
            .values(status=JobStatus.SUCCEEDED, completed_at=utcnow())
        )
        thread, outcome = cancel_in_thread(settings, job_id)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()
    thread.join(10)
    (result,) = outcome
    assert isinstance(result, ConflictError)
    assert status(settings, job_id) == (JobStatus.SUCCEEDED, False)


def test_a_queued_job_is_canceled_and_a_claim_after_it_takes_nothing(settings: Settings) -> None:
    (job_id,) = make_jobs(settings, 1)
    with session_scope(settings) as session:
        job = job_service.cancel_job(session=session, job_id=str(job_id), client_id=None)
        assert job.status == JobStatus.CANCELED
    with session_scope(settings) as session:
        assert job_service.claim_jobs(session=session, job_ids=[job_id], lease_seconds=60) == []
    assert status(settings, job_id) == (JobStatus.CANCELED, True)


def expire_lease(settings: Settings, job_id: uuid.UUID, *, attempts: int) -> None:
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.RUNNING,
                attempts=attempts,
                lease_token=uuid.uuid4(),
                lease_expires_at=utcnow() - timedelta(seconds=1),
            )
        )


def test_an_expired_lease_is_taken_over_only_on_the_first_attempt(settings: Settings) -> None:
    """A delivery that finds a job whose worker died takes it over on its first attempt; one
    lost twice is left to the reconciler's attempt limit and quarantine, so a stray message
    (a dead worker's, restored by Redis after its visibility timeout) cannot run it past them."""
    first, again, last = make_jobs(settings, 3)
    expire_lease(settings, first, attempts=1)
    expire_lease(settings, again, attempts=2)
    expire_lease(settings, last, attempts=3)
    with session_scope(settings) as session:
        claimed = job_service.claim_jobs(
            session=session, job_ids=[first, again, last], lease_seconds=60
        )
    assert [(c.id, c.attempts) for c in claimed] == [(first, 2)]


def test_an_expired_lease_is_not_taken_over_past_the_attempt_limit(settings: Settings) -> None:
    """With SEG_JOB_MAX_ATTEMPTS=1 a job's first lost run is its last: the reconciler ends it
    failed, so a stray delivery must not run it a second time first."""
    (job_id,) = make_jobs(settings, 1)
    expire_lease(settings, job_id, attempts=1)
    with session_scope(settings) as session:
        claimed = job_service.claim_jobs(
            session=session, job_ids=[job_id], lease_seconds=60, max_attempts=1
        )
    assert claimed == []
    with session_scope(settings) as session:
        claimed = job_service.claim_jobs(
            session=session, job_ids=[job_id], lease_seconds=60, max_attempts=3
        )
    assert [(c.id, c.attempts) for c in claimed] == [(job_id, 2)]


def test_a_job_lets_go_of_its_model_input_when_it_ends_and_keeps_its_upload(
    settings: Settings,
) -> None:
    succeeded, failed, canceled, canceled_running, released = make_jobs(settings, 5)
    with session_scope(settings) as session:
        claims = {
            c.id: c
            for c in job_service.claim_jobs(
                session=session,
                job_ids=[succeeded, failed, canceled_running, released],
                lease_seconds=60,
            )
        }
    with session_scope(settings) as session:
        job_service.cancel_job(session=session, job_id=str(canceled), client_id=None)
        job_service.cancel_job(session=session, job_id=str(canceled_running), client_id=None)
    with session_scope(settings) as session:
        job_service.complete_jobs(
            session=session,
            results=[
                result(succeeded, claims[succeeded].lease_token),
                result(canceled_running, claims[canceled_running].lease_token),
            ],
        )
        job_service.fail_job(
            session=session,
            job_id=failed,
            code="bad_input",
            message="no",
            lease_token=claims[failed].lease_token,
        )
        assert job_service.release_job(
            session=session, job_id=released, lease_token=claims[released].lease_token
        )
    for job_id in (succeeded, failed, canceled, canceled_running):
        assert inputs_kept(settings, job_id) == (True, False)
    # A job given back runs again: it keeps what its next claim reads.
    assert inputs_kept(settings, released) == (True, True)
    with session_scope(settings) as session:
        (again,) = job_service.claim_jobs(session=session, job_ids=[released], lease_seconds=60)
    assert again.model_input is not None


def claim_then_cancel(settings: Settings, n: int) -> list[job_service.Claimed]:
    """`n` jobs with a webhook, claimed by a worker, then canceled by their client (running:
    the cancel only asks them to stop at the batch boundary)."""
    ids = make_jobs(settings, n)
    with session_scope(settings) as session:
        session.execute(
            update(Job).where(Job.id.in_(ids)).values(webhook_url="https://example.com/hook")
        )
    with session_scope(settings) as session:
        claimed = job_service.claim_jobs(session=session, job_ids=ids, lease_seconds=60)
    with session_scope(settings) as session:
        for job_id in ids:
            job_service.cancel_job(session=session, job_id=str(job_id), client_id=None)
    return sorted(claimed, key=lambda c: ids.index(c.id))


def completed_events(settings: Settings, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The payloads of the job's job.completed webhook messages."""
    with session_scope(settings) as session:
        return [
            m.payload
            for m in session.scalars(
                select(WebhookMessage).where(
                    WebhookMessage.job_id == job_id, WebhookMessage.event_type == JOB_COMPLETED
                )
            )
        ]


def ended_row(settings: Settings, job_id: uuid.UUID) -> Job:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        _ = job.mask_png  # deferred: load it before the session closes
        session.expunge(job)
        return job


def test_complete_jobs_stores_no_result_for_a_job_canceled_while_running(
    settings: Settings,
) -> None:
    """A cancel that arrived while the batch ran ends the job canceled at its result: the job
    keeps no mask or class fractions, and its webhook and end state carry no result."""
    (claimed,) = claim_then_cancel(settings, 1)
    (done,) = make_jobs(settings, 1)
    with session_scope(settings) as session:
        (done_claim,) = job_service.claim_jobs(session=session, job_ids=[done], lease_seconds=60)
    with session_scope(settings) as session:
        states = job_service.complete_jobs(
            session=session,
            results=[result(claimed.id, claimed.lease_token), result(done, done_claim.lease_token)],
        )
    job = ended_row(settings, claimed.id)
    assert (job.status, job.error_code) == (JobStatus.CANCELED, "canceled")
    assert (job.mask_png, job.class_fractions, job.model_version, job.batch_size) == (
        None,
        None,
        None,
        None,
    )
    state = states[str(claimed.id)]
    assert state["status"] == JobStatus.CANCELED
    assert (state["class_fractions"], state["model_version"]) == (None, None)
    assert set(state) == set(job_service.END_STATE_COLUMNS)
    assert states[str(done)]["class_fractions"] == [1, 0, 0]
    assert ended_row(settings, done).mask_png == b"x"
    (event,) = completed_events(settings, claimed.id)
    assert (event["status"], event["result"], event["model_version"]) == ("canceled", None, None)


def test_fail_job_ends_a_job_canceled_while_running_canceled(settings: Settings) -> None:
    """A failure at the batch boundary of a job its client canceled ends it canceled, as a
    result would: the client asked for that, and its webhook says so."""
    (claimed,) = claim_then_cancel(settings, 1)
    with session_scope(settings) as session:
        assert job_service.fail_job(
            session=session,
            job_id=claimed.id,
            code="postprocess_failed",
            message="Preparing the result failed.",
            lease_token=claimed.lease_token,
            model_version="v",
        )
    job = ended_row(settings, claimed.id)
    assert (job.status, job.error_code, job.model_version) == (
        JobStatus.CANCELED,
        "canceled",
        None,
    )
    (event,) = completed_events(settings, claimed.id)
    assert (event["status"], event["error"]["code"]) == ("canceled", "canceled")


def test_release_job_ends_a_job_canceled_while_running_canceled(settings: Settings) -> None:
    """A batch given back (its forward pass failed) does not put a job its client canceled
    back in the queue: it ends canceled at once, with its webhook."""
    (claimed,) = claim_then_cancel(settings, 1)
    with session_scope(settings) as session:
        assert not job_service.release_job(
            session=session, job_id=claimed.id, lease_token=claimed.lease_token
        )
    job = ended_row(settings, claimed.id)
    assert (job.status, job.error_code, job.releases) == (JobStatus.CANCELED, "canceled", 0)
    assert job.completed_at is not None
    (event,) = completed_events(settings, claimed.id)
    assert event["status"] == "canceled"


def make_suspect(settings: Settings, job_id: uuid.UUID) -> None:
    """The job was lost twice and the reconciler sent it again: a queued suspect."""
    with session_scope(settings) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status=JobStatus.QUEUED, attempts=2)
        )


def test_claim_jobs_takes_a_suspect_only_alone(settings: Settings) -> None:
    """A suspect claimed with fresh jobs would share their fate: a fresh crasher beside it
    would have it judged poison, and a poison suspect would take their runs down. A claim
    naming it among others leaves it (its own message names it alone), and one naming it alone
    takes it and says it is a suspect."""
    suspect, fresh, other = make_jobs(settings, 3)
    make_suspect(settings, suspect)
    with session_scope(settings) as session:
        claimed = job_service.claim_jobs(
            session=session, job_ids=[suspect, fresh, other], lease_seconds=60
        )
    assert sorted((c.id, c.suspect) for c in claimed) == sorted([(fresh, False), (other, False)])
    assert status(settings, suspect) == (JobStatus.QUEUED, False)
    with session_scope(settings) as session:
        (alone,) = job_service.claim_jobs(
            session=session, job_ids=[suspect, suspect], lease_seconds=60
        )
    assert (alone.id, alone.suspect, alone.attempts) == (suspect, True, 3)


def _released_long_ago(settings: Settings, job_id: uuid.UUID, **values: Any) -> None:
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_give_back_job_a_short_outage_after_one_old_release_fails_nothing(
    settings: Settings,
) -> None:
    """docs/durability.md: a job fails only when releases keep coming for five minutes. One
    release six minutes ago (a GPU OOM, then a backlog), then four within a second of a short
    blob-store outage: the job ended failed, the window timed from that old release."""
    from tests.worker.test_reconciler import claim, get, make_job, release

    job_id = make_job(settings)
    assert release(settings, claim(settings, job_id))
    _released_long_ago(settings, job_id, first_released_at=utcnow() - timedelta(minutes=6))
    outcomes = [release(settings, claim(settings, job_id)) for _ in range(4)]
    job = get(settings, job_id)
    assert outcomes == [True] * 4, (job.status, job.error_code)
    assert (job.status, job.releases) == ("queued", 5)  # every release counted: no lost run


def test_give_back_job_restarts_the_window_after_a_quiet_gap(settings: Settings) -> None:
    """Two releases long ago (both six minutes old), then an outage of a few seconds."""
    from tests.worker.test_reconciler import claim, get, make_job, release

    job_id = make_job(settings)
    for _ in range(2):
        assert release(settings, claim(settings, job_id))
    long_ago = utcnow() - timedelta(minutes=6)
    _released_long_ago(settings, job_id, first_released_at=long_ago, last_released_at=long_ago)
    assert [release(settings, claim(settings, job_id)) for _ in range(4)] == [True] * 4
    job = get(settings, job_id)
    assert (job.status, job.releases, job.window_releases) == ("queued", 6, 4)
    assert job.first_released_at is not None
    assert job.first_released_at > long_ago


def test_give_back_job_a_failure_that_keeps_coming_for_five_minutes_still_ends_the_job(
    settings: Settings,
) -> None:
    """Releases every two minutes for eight minutes (no quiet gap): the fifth ends the job."""
    from tests.worker.test_reconciler import claim, get, make_job, release

    job_id = make_job(settings)
    for _ in range(job_service.MAX_RELEASES - 1):
        assert release(settings, claim(settings, job_id))
    now = utcnow()
    _released_long_ago(
        settings,
        job_id,
        first_released_at=now - timedelta(minutes=8),
        last_released_at=now - timedelta(minutes=2),
    )
    assert not release(settings, claim(settings, job_id))
    job = get(settings, job_id)
    assert (job.status, job.error_code) == ("failed", "worker_error")


def test_give_back_job_a_row_released_before_the_window_columns_gives_up_as_before(
    settings: Settings,
) -> None:
    """Released before 0011 (no last release, no window count): its releases all count."""
    from tests.worker.test_reconciler import claim, get, make_job, release

    job_id = make_job(settings)
    claimed = claim(settings, job_id)
    _released_long_ago(
        settings,
        job_id,
        releases=job_service.MAX_RELEASES - 1,
        attempts=Job.attempts + job_service.MAX_RELEASES - 1,
        first_released_at=utcnow() - timedelta(seconds=job_service.RELEASE_GIVE_UP_S + 1),
    )
    assert not release(settings, claimed)
    assert get(settings, job_id).error_code == "worker_error"


def test_give_back_job_releases_far_apart_still_end_the_job_in_the_end(settings: Settings) -> None:
    """A requeued message goes to the back of the queue: behind a backlog that takes over 5
    minutes to drain, each release restarted the window, and a job whose batch always failed
    cycled for ever. MAX_RELEASES_IN_ALL ends it, however far apart the releases."""
    from tests.worker.test_reconciler import claim, get, make_job, release

    job_id = make_job(settings)
    outcomes = []
    for i in range(job_service.MAX_RELEASES_IN_ALL + 5):
        claimed = claim(settings, job_id)
        ago = utcnow() - timedelta(minutes=6)
        with session_scope(settings) as session:  # the previous release was 6 minutes ago
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(last_released_at=ago if i else None, first_released_at=ago if i else None)
            )
        outcomes.append(release(settings, claimed))
        if not outcomes[-1]:
            break
    job = get(settings, job_id)
    assert job.status == "failed"
    assert job.error_code == "worker_error"
    assert len(outcomes) == job_service.MAX_RELEASES_IN_ALL
