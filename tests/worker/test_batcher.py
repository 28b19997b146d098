"""worker/batcher.py in-process with a real Segmenter on real Postgres: batch formation, the
claim of the next full batch beside the model, and how failures settle messages."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from segsvc.db import session_scope
from segsvc.models import Job, JobStatus
from segsvc.settings import Settings
from tests.segsvc.test_db import holding
from tests.worker.test_segmenter import HOLD_S, LOCK_JOBS, make_jobs, rows, worker_settings
from worker import batcher as batcher_module
from worker.batcher import Item, MicroBatcher
from worker.segmenter import Claim, Inferred, Segmenter

pytestmark = pytest.mark.timeout(180)


class Recorder:
    """Wraps a Segmenter: records which thread claimed which ids, holds the first forward pass
    until released (so a backlog can build up behind it), and can fail chosen claims."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self.claims: list[tuple[str, list[str]]] = []
        self.in_first_forward = threading.Event()
        self.release_first_forward = threading.Event()
        self.fail_claim_of: set[str] = set()
        self.fail_forward_of: set[str] = set()
        self.settled: dict[str, str] = {}
        self.all_settled = threading.Event()
        self.expected = 0
        self.os_thread_names: dict[str, str] = {}  # stage -> the thread's name as the OS sees it
        self._lock = threading.Lock()

    def _saw(self, stage: str) -> None:
        name = Path("/proc/thread-self/comm").read_text().strip()
        self.os_thread_names.setdefault(f"{stage} in {threading.current_thread().name}", name)

    def claim(self, job_ids: Sequence[str], *, suspects: bool = True) -> Claim:
        self._saw("claim")
        self.claims.append((threading.current_thread().name.split("_")[0], list(job_ids)))
        if self.fail_claim_of & set(job_ids):
            raise RuntimeError("database went away")
        return self.segmenter.claim(job_ids, suspects=suspects)

    def forward(self, claim: Claim) -> Inferred:
        self._saw("forward")
        if not self.in_first_forward.is_set():
            self.in_first_forward.set()
            assert self.release_first_forward.wait(60)
        claimed = {str(job.id) for _, jobs, _ in claim.inputs for job in jobs}
        if self.fail_forward_of & claimed:
            raise RuntimeError("CUDA_ERROR_OUT_OF_MEMORY")
        return self.segmenter.forward(claim)

    def store(self, batch: Inferred) -> dict[str, int]:
        self._saw("store")
        return self.segmenter.store(batch)

    def __getattr__(self, name: str) -> Any:  # release: the real one
        return getattr(self.segmenter, name)

    def item(self, job_id: str) -> Item:
        return Item(
            job_id, lambda: self._settle(job_id, "ack"), lambda: self._settle(job_id, "requeue")
        )

    def _settle(self, job_id: str, how: str) -> None:
        with self._lock:
            self.settled[job_id] = how
            if len(self.settled) == self.expected:
                self.all_settled.set()


@pytest.fixture
def recorder(
    settings: Settings, production_model: str, monkeypatch: pytest.MonkeyPatch
) -> Recorder:
    monkeypatch.setattr(batcher_module, "RETRY_PAUSE_S", 0.0)
    return Recorder(Segmenter(settings.model_copy(update={"registry_poll_seconds": 0})))


@pytest.fixture
def worker_recorder(
    settings: Settings, production_model: str, monkeypatch: pytest.MonkeyPatch
) -> Recorder:
    """A Recorder whose Segmenter has an inference worker's statement limits (0.3 s lock
    timeout)."""
    monkeypatch.setattr(batcher_module, "RETRY_PAUSE_S", 0.0)
    return Recorder(Segmenter(worker_settings(settings)))


def start(recorder: Recorder, ids: list[str]) -> MicroBatcher:
    """A batcher of 2 with the first job running and the rest waiting behind it."""
    recorder.expected = len(ids)
    batcher = MicroBatcher(recorder, max_size=2, max_wait_s=0.0)  # type: ignore[arg-type]
    batcher.put(recorder.item(ids[0]))
    assert recorder.in_first_forward.wait(60)
    for job_id in ids[1:]:
        batcher.put(recorder.item(job_id))
    return batcher


def test_the_next_full_batch_is_claimed_while_the_model_runs(
    settings: Settings, recorder: Recorder
) -> None:
    uuids = make_jobs(settings, 6)
    ids = [str(i) for i in uuids]
    batcher = start(recorder, ids)
    recorder.release_first_forward.set()
    assert recorder.all_settled.wait(60)
    batcher.close()
    # Formed when the model was free: [0], then [1, 2]; while [1, 2] ran, [3, 4] was waiting
    # in full, so the claim thread took it; [5] alone is not a full batch, so the model thread
    # claimed it once free.
    assert recorder.claims == [
        ("seg-model", ids[:1]),
        ("seg-model", ids[1:3]),
        ("seg-claim", ids[3:5]),
        ("seg-model", ids[5:]),
    ]
    assert set(recorder.settled.values()) == {"ack"}
    assert [job.status for job in rows(settings, uuids)] == [JobStatus.SUCCEEDED] * 6
    # Each stage ran on its own thread, named for the OS too (top -H, ps -L, make bench).
    assert recorder.os_thread_names == {
        "claim in seg-model": "seg-model",
        "forward in seg-model": "seg-model",
        "claim in seg-claim_0": "seg-claim",
        "store in seg-store_0": "seg-store",
    }


def test_a_failed_claim_ahead_requeues_only_its_batch(
    settings: Settings, recorder: Recorder
) -> None:
    ids = [str(i) for i in make_jobs(settings, 5)]
    recorder.fail_claim_of = {ids[3]}
    batcher = start(recorder, ids)
    recorder.release_first_forward.set()
    assert recorder.all_settled.wait(60)
    batcher.close()
    assert ("seg-claim", ids[3:5]) in recorder.claims
    assert recorder.settled == {
        ids[0]: "ack",
        ids[1]: "ack",
        ids[2]: "ack",
        ids[3]: "requeue",
        ids[4]: "requeue",
    }


def test_a_batch_claimed_ahead_still_runs_when_the_worker_stops(
    settings: Settings, recorder: Recorder
) -> None:
    ids = [str(i) for i in make_jobs(settings, 5)]
    batcher = start(recorder, ids)
    recorder.release_first_forward.set()
    while not any(thread == "seg-claim" for thread, _ in recorder.claims):
        assert not recorder.all_settled.is_set()
        threading.Event().wait(0.01)
    batcher.close()  # [1, 2] or [3, 4] may be running; both must finish, nothing else starts
    assert {ids[i]: recorder.settled.get(ids[i]) for i in range(5)} == {
        ids[0]: "ack",
        ids[1]: "ack",
        ids[2]: "ack",
        ids[3]: "ack",
        ids[4]: "ack",
    }


def test_a_backlog_batch_waits_for_stragglers_and_a_lone_job_does_not(
    settings: Settings, recorder: Recorder
) -> None:
    ids = [str(i) for i in make_jobs(settings, 4)]
    recorder.expected = 4
    recorder.segmenter.load()  # not on the clock: a first load takes seconds
    # A wait far longer than any hiccup of a loaded machine: waiting it out shows either way.
    batcher = MicroBatcher(recorder, max_size=3, max_wait_s=30.0)  # type: ignore[arg-type]
    sent = time.monotonic()
    batcher.put(recorder.item(ids[0]))
    assert recorder.in_first_forward.wait(60)
    assert time.monotonic() - sent < 10  # an idle worker runs a lone job at once
    batcher.put(recorder.item(ids[1]))
    batcher.put(recorder.item(ids[2]))
    recorder.release_first_forward.set()  # [1, 2] is a backlog, not full: it waits
    deadline = time.monotonic() + 30
    while batcher._items:  # until the model thread has taken [1, 2]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    batcher.put(recorder.item(ids[3]))  # a straggler within the wait fills it: it runs
    assert recorder.all_settled.wait(60)
    batcher.close()
    assert [ids for _, ids in recorder.claims] == [ids[:1], ids[1:]]


def test_a_batch_submits_jobs_on_an_idle_worker_run_at_once_and_together(
    settings: Settings, recorder: Recorder
) -> None:
    """One message of several jobs (a batch submit) was taken for a backlog: on an idle worker
    its batch waited the whole SEG_BATCH_MAX_WAIT_MS for stragglers that never came."""
    ids = [str(i) for i in make_jobs(settings, 4)]
    recorder.expected = 4
    recorder.segmenter.load()  # not on the clock: a first load takes seconds
    batcher = MicroBatcher(recorder, max_size=32, max_wait_s=30.0)  # type: ignore[arg-type]
    sent = time.monotonic()
    batcher.put_many([recorder.item(job_id) for job_id in ids])
    assert recorder.in_first_forward.wait(60)
    assert time.monotonic() - sent < 10  # not the 30 s wait
    recorder.release_first_forward.set()
    assert recorder.all_settled.wait(60)
    batcher.close()
    assert [claimed for _, claimed in recorder.claims] == [ids]  # one claim, all four


def run_alone(recorder: Recorder, ids: list[str]) -> None:
    """Put `ids` into a batcher of 2 that does not hold its first pass; wait until settled."""
    recorder.expected = len(ids)
    recorder.in_first_forward.set()
    batcher = MicroBatcher(recorder, max_size=2, max_wait_s=0.0)  # type: ignore[arg-type]
    for job_id in ids:
        batcher.put(recorder.item(job_id))
    assert recorder.all_settled.wait(60)
    batcher.close()


def test_a_failed_forward_pass_gives_its_jobs_back_before_requeueing(
    settings: Settings, recorder: Recorder
) -> None:
    """A forward pass that raises (a GPU out of memory) after the claim: the jobs go back to
    queued at once, so the redelivered messages claim them instead of finding them leased,
    being acknowledged and waiting for the reconciler to count a lost attempt."""
    uuids = make_jobs(settings, 2)
    ids = [str(i) for i in uuids]
    recorder.fail_forward_of = {ids[0]}
    run_alone(recorder, ids)
    assert recorder.settled == {ids[0]: "requeue", ids[1]: "requeue"}
    for job in rows(settings, uuids):
        assert (job.status, job.lease_token, job.error_code) == (JobStatus.QUEUED, None, None)
    recorder.fail_forward_of = set()  # the redelivery runs them
    recorder.settled, recorder.all_settled = {}, threading.Event()
    run_alone(recorder, ids)
    assert recorder.settled == {ids[0]: "ack", ids[1]: "ack"}
    assert [job.status for job in rows(settings, uuids)] == [JobStatus.SUCCEEDED] * 2


def test_a_storage_error_requeues_the_batch_instead_of_failing_its_jobs(
    settings: Settings, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing a mask fails (a full disk under SEG_BLOB_STORE=fs): not the images' fault."""
    uuids = make_jobs(settings, 2)
    ids = [str(i) for i in uuids]

    def disk_full(data: bytes) -> bytes:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recorder.segmenter.blobs, "put", disk_full)
    run_alone(recorder, ids)
    assert recorder.settled == {ids[0]: "requeue", ids[1]: "requeue"}
    for job in rows(settings, uuids):
        assert (job.status, job.error_code, job.mask_png) == (JobStatus.QUEUED, None, None)


def test_a_batch_whose_close_timed_out_is_released_and_requeued(
    settings: Settings, recorder: Recorder
) -> None:
    """close() stops waiting for a slow forward pass and shuts the store pool down: the model
    thread must then give the claimed jobs back instead of dying holding their leases."""
    uuids = make_jobs(settings, 1)
    ids = [str(i) for i in uuids]
    batcher = start(recorder, ids)
    batcher.close(timeout=0.1)  # the first forward pass is still held
    recorder.release_first_forward.set()
    assert recorder.all_settled.wait(30)
    assert recorder.settled == {ids[0]: "requeue"}
    batcher._thread.join(10)
    assert not batcher._thread.is_alive()
    for job in rows(settings, uuids):
        assert (job.status, job.lease_token, job.error_code) == (JobStatus.QUEUED, None, None)


def test_close_waits_for_a_late_batch_to_be_released_before_it_returns(
    settings: Settings, recorder: Recorder
) -> None:
    """The forward pass outlasts close()'s wait: close() shuts the pools and then waits for the
    model thread to give the claimed jobs back, instead of returning (and the process exiting)
    while it still holds their leases."""
    uuids = make_jobs(settings, 1)
    batcher = start(recorder, [str(i) for i in uuids])
    shut_pool = batcher._post.shutdown

    def shut_then_release(wait: bool = True, *, cancel_futures: bool = False) -> None:
        # The forward pass ends only once close()'s first wait is over and the pools are shut,
        # however slow this machine is: close() must then wait for the release itself.
        shut_pool(wait=wait, cancel_futures=cancel_futures)
        recorder.release_first_forward.set()

    batcher._post.shutdown = shut_then_release  # type: ignore[method-assign]
    batcher.close(timeout=2)  # the first forward pass is still held when the first wait ends
    assert not batcher._thread.is_alive()
    for job in rows(settings, uuids):
        assert (job.status, job.lease_token) == (JobStatus.QUEUED, None)


def test_a_batch_held_too_long_reads_as_a_stalled_pipeline(
    recorder: Recorder, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the liveness probe was refreshed by Celery's heartbeat alone, so a wedged
    # model or store thread kept its messages for ever while the worker looked alive.
    import sys

    from worker import observability
    from worker.probes import ALIVE

    ids = [str(i) for i in make_jobs(settings, 1)]
    batcher = start(recorder, ids)  # its first forward pass is held
    assert batcher.stalled(limit_s=60) is None
    time.sleep(0.2)
    assert "held the model thread" in (batcher.stalled(limit_s=0.1) or "")

    tasks = type(sys)("worker.tasks")
    tasks.current_batcher = lambda: batcher  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.tasks", tasks)
    monkeypatch.setattr(observability, "PIPELINE_STALL_S", 0.1)
    cfg = settings.model_copy(update={"probe_dir": tmp_path})
    monkeypatch.setattr(observability, "get_settings", lambda: cfg)
    observability._heartbeat()
    assert not (tmp_path / ALIVE).exists()  # stalled: not alive

    recorder.release_first_forward.set()
    assert recorder.all_settled.wait(60)
    deadline = time.monotonic() + 10
    while batcher.stalled(limit_s=0.1) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.stalled(limit_s=0.1) is None  # idle, waiting for work: not a stall
    observability._heartbeat()
    assert (tmp_path / ALIVE).exists()
    batcher.close()


def settle_behind_locked_jobs(settings: Settings, recorder: Recorder, ids: list[str]) -> None:
    """Claim `ids` and end their forward pass while `jobs` is locked: what the batch writes
    next (its result or its release) must wait for the lock, not fail, and settle after it."""
    batcher = start(recorder, ids)  # claimed; its forward pass is held
    assert settings.database_url is not None
    with holding(settings.database_url, LOCK_JOBS, seconds=HOLD_S):
        recorder.release_first_forward.set()
        assert not recorder.all_settled.wait(1.5)  # waiting for the lock, past its 0.3 s timeout
    assert recorder.all_settled.wait(30)
    batcher.close()


def test_a_store_behind_a_locked_jobs_table_waits_and_commits(
    settings: Settings, worker_recorder: Recorder
) -> None:
    # Regression: the store failed at the worker's lock timeout behind a migration's lock, and
    # so did its release; the job stayed running until its lease expired, a lost run (two make
    # it a suspect, three end it failed), where before the limits the store waited and committed.
    uuids = make_jobs(settings, 1)
    ids = [str(i) for i in uuids]
    settle_behind_locked_jobs(settings, worker_recorder, ids)  # the store waits, then commits
    assert worker_recorder.settled == {ids[0]: "ack"}
    (job,) = rows(settings, uuids)
    assert (job.status, job.attempts, job.releases) == (JobStatus.SUCCEEDED, 1, 0)


def test_a_failed_store_behind_a_locked_jobs_table_is_still_released(
    settings: Settings, worker_recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob store fails the batch while `jobs` is locked: its release waits for the lock,
    so the run counts as a release, not as a lost run."""
    uuids = make_jobs(settings, 1)
    ids = [str(i) for i in uuids]

    def disk_full(data: bytes) -> bytes:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker_recorder.segmenter.blobs, "put", disk_full)
    settle_behind_locked_jobs(settings, worker_recorder, ids)  # the release waits, then commits
    assert worker_recorder.settled == {ids[0]: "requeue"}
    (job,) = rows(settings, uuids)
    assert (job.status, job.lease_token) == (JobStatus.QUEUED, None)
    assert (job.attempts, job.releases) == (1, 1)  # attempts - releases: no lost run


class Timeline(Recorder):
    """A Recorder that also logs when each stage starts and ends, and for which jobs."""

    def __init__(self, segmenter: Segmenter) -> None:
        super().__init__(segmenter)
        self.events: list[tuple[str, str, frozenset[str]]] = []

    def _log(self, stage: str, edge: str, ids: set[str]) -> None:
        with self._lock:
            self.events.append((stage, edge, frozenset(ids)))

    def claim(self, job_ids: Sequence[str], *, suspects: bool = True) -> Claim:
        self._log("claim", "start", set(job_ids))
        try:
            return super().claim(job_ids, suspects=suspects)
        finally:
            self._log("claim", "end", set(job_ids))

    def forward(self, claim: Claim) -> Inferred:
        ids = {str(job.id) for _, jobs, _ in claim.inputs for job in jobs}
        self._log("forward", "start", ids)
        try:
            return super().forward(claim)
        finally:
            self._log("forward", "end", ids)

    def store(self, batch: Inferred) -> dict[str, int]:
        ids = {str(job.id) for group in batch.groups for job in group.jobs}
        self._log("store", "start", ids)
        try:
            return super().store(batch)
        finally:
            self._log("store", "end", ids)


def test_a_suspect_runs_alone_with_nothing_else_in_the_pipeline(
    settings: Settings, production_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspect the reconciler sent (lost twice: it may crash the worker) forms a batch of its
    own, is claimed only once the batch before it is stored, and nothing is claimed or run
    until it is stored: a poison suspect takes no other job's run down with it, and an innocent
    one is not judged poison because a job beside it crashed the worker."""
    monkeypatch.setattr(batcher_module, "RETRY_PAUSE_S", 0.0)
    timeline = Timeline(Segmenter(settings.model_copy(update={"registry_poll_seconds": 0})))
    uuids = make_jobs(settings, 6)
    suspect_id = uuids[3]
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == suspect_id).values(attempts=2))
    ids = [str(i) for i in uuids]
    suspect = str(suspect_id)
    timeline.expected = len(ids)
    batcher = MicroBatcher(timeline, max_size=2, max_wait_s=0.0)  # type: ignore[arg-type]
    batcher.put(timeline.item(ids[0]))
    assert timeline.in_first_forward.wait(60)
    for job_id in ids[1:]:  # a backlog of fresh jobs around the suspect
        item = timeline.item(job_id)
        batcher.put(Item(item.job_id, item.ack, item.requeue, suspect=job_id == suspect))
    timeline.release_first_forward.set()
    assert timeline.all_settled.wait(60)
    batcher.close()
    assert set(timeline.settled.values()) == {"ack"}
    assert [job.status for job in rows(settings, uuids)] == [JobStatus.SUCCEEDED] * 6
    assert rows(settings, [suspect_id])[0].batch_size == 1
    events = timeline.events
    began = events.index(("claim", "start", frozenset({suspect})))
    ended = events.index(("store", "end", frozenset({suspect})))
    # Every stage of another batch ended before the suspect's claim, or began after its store.
    before, during = events[:began], events[began : ended + 1]
    assert all(job_ids == {suspect} for _, _, job_ids in during), during
    started = Counter((stage, job_ids) for stage, edge, job_ids in before if edge == "start")
    finished = Counter((stage, job_ids) for stage, edge, job_ids in before if edge == "end")
    assert started == finished, before
    assert ("store", frozenset({ids[0]})) in finished  # the batch before it was stored first


def test_a_suspect_is_claimed_only_from_its_marked_message(
    settings: Settings, production_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stray unmarked copy of a suspect's message (the reconciler's first re-send, restored
    by Redis from a dead worker an hour later) had the suspect claimed at once, while the batch
    before it was still being stored: if that batch killed the worker, the suspect lost a run it
    was to have alone, and on its last attempt ended poison_input. It is left to the marked
    message, which runs it alone once the batches before it are stored."""
    monkeypatch.setattr(batcher_module, "RETRY_PAUSE_S", 0.0)
    timeline = Timeline(Segmenter(settings.model_copy(update={"registry_poll_seconds": 0})))
    first, suspect_id = make_jobs(settings, 2)
    with session_scope(settings) as session:  # lost twice, re-sent: queued again
        session.execute(update(Job).where(Job.id == suspect_id).values(attempts=2))
    suspect = str(suspect_id)
    timeline.expected = 2  # settles are kept by job id: the first job, the suspect's copy
    batcher = MicroBatcher(timeline, max_size=1, max_wait_s=0.0)  # type: ignore[arg-type]
    batcher.put(timeline.item(str(first)))
    assert timeline.in_first_forward.wait(60)
    batcher.put(timeline.item(suspect))  # the stray copy, unmarked
    timeline.release_first_forward.set()
    assert timeline.all_settled.wait(60)
    assert timeline.settled == {str(first): "ack", suspect: "ack"}  # the copy is done with
    assert rows(settings, [suspect_id])[0].status == JobStatus.QUEUED  # not claimed from it
    assert rows(settings, [suspect_id])[0].attempts == 2
    item = timeline.item(suspect)
    batcher.put(Item(item.job_id, item.ack, item.requeue, suspect=True))  # the marked message
    deadline = time.monotonic() + 60
    while rows(settings, [suspect_id])[0].status != JobStatus.SUCCEEDED:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    batcher.close()
    (job,) = rows(settings, [suspect_id])
    assert (job.status, job.attempts, job.batch_size) == (JobStatus.SUCCEEDED, 3, 1)
    events = timeline.events
    # The marked message's claim (the last for the suspect) came after the batch before it was
    # stored.
    claimed = max(i for i, e in enumerate(events) if e == ("claim", "start", frozenset({suspect})))
    assert ("store", "end", frozenset({str(first)})) in events[:claimed]
