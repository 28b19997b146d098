"""Dynamic micro-batching (Triton-style) fed by Celery's consumer.

Celery's consumer loop only hands each `segsvc.run_job` message to `MicroBatcher.put`; it never
runs the model, so it keeps reading messages while a batch runs. One model thread takes a batch
the moment the model is free: everything waiting, up to `batch_max_size`. Only when that batch
came from a backlog (more than one message waiting) and is not full does it wait up to
`batch_max_wait_ms` for stragglers, so an idle queue adds no delay, a batch submit's one
message of several jobs included. While a full batch more is already waiting, a claim thread
claims it during the current forward pass. A post thread turns logits into masks and commits
the batch while the model thread already runs the next one; messages are acknowledged only
after that commit.

A suspect (a job the reconciler re-sends after it was lost twice: it may be what crashes the
worker) runs alone: its message says so, it forms a batch of its own once the batches before it
are stored, nothing is claimed beside it, and the next batch starts once it is stored. So a
poison suspect takes no other job's run down with it, and an innocent one is not judged poison
because a job beside it crashed the worker.

Why not celery-batches: it flushes on `flush_every` messages or on a repeating
`flush_interval` timer, not when the model becomes free, so under load it runs tiny batches
back to back (with the solo pool it also cannot read messages during a forward pass).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from setproctitle import setthreadtitle

from worker.segmenter import Claim, Inferred, Segmenter

log = logging.getLogger(__name__)

MODEL_THREAD = "seg-model"
RETRY_PAUSE_S = 1.0  # after a failed batch, so a database outage does not spin the worker


@dataclass(frozen=True)
class Item:
    """One delivered message: its job id and how to settle it on the consumer's loop."""

    job_id: str
    ack: Callable[[], Any]
    requeue: Callable[[], Any]
    suspect: bool = False  # the reconciler sent it as a suspect: it runs alone


class MicroBatcher:
    """Forms batches when the model is free and pipelines them through infer -> store."""

    def __init__(self, segmenter: Segmenter, *, max_size: int, max_wait_s: float) -> None:
        self.segmenter = segmenter
        self.max_size = max(1, max_size)
        self.max_wait_s = max(0.0, max_wait_s)
        self._items: deque[Item] = deque()
        # Messages with items waiting (a partly taken one counts until the items run out): a
        # backlog is several messages, not one batch submit's several jobs.
        self._messages = 0
        self._suspects: deque[Item] = deque()  # each runs alone, before the items
        self._cond = threading.Condition()
        self._stopping = False
        # One post thread keeps results in order; at most two batches wait for it, so a slow
        # database slows the model thread down instead of piling up memory.
        self._post = _named_thread("seg-store")
        self._post_slots = threading.BoundedSemaphore(2)
        self._claimer = _named_thread("seg-claim")
        # When the model thread took the batch it is working on (None between batches): see
        # `stalled`.
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=MODEL_THREAD, daemon=True)
        self._thread.start()

    def put(self, item: Item) -> None:
        """A message of one job (`put_many`)."""
        self.put_many([item])

    def put_many(self, items: Sequence[Item]) -> None:
        """Called by the consumer loop with each message's jobs, all at once (the model thread
        then sees them together, as one message); never blocks."""
        with self._cond:
            for item in items:
                (self._suspects if item.suspect else self._items).append(item)
            if any(not item.suspect for item in items):
                self._messages += 1
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight and store it; unstarted messages stay unacknowledged."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._claimer.shutdown(wait=True)
        self._post.shutdown(wait=True)
        # A model thread still on a batch after `timeout` (the database stalled) finds the
        # pools shut once it gets a slot, and releases its claimed jobs (`_run`): wait for
        # that too, or the process exits holding their leases until they run out.
        self._thread.join(timeout)

    def stalled(self, limit_s: float) -> str | None:
        """Why this pipeline no longer turns, or None: its model thread died, or has been on
        one batch (claim, forward pass, or waiting for the store thread to take it) for over
        `limit_s`. The liveness probe stops being refreshed then, so the orchestrator restarts
        a worker that would otherwise hold its messages while looking alive."""
        if not self._thread.is_alive() and not self._stopping:
            return "the model thread has died"
        since = self._busy_since
        if since is not None and time.monotonic() - since > limit_s:
            return f"one batch has held the model thread for {time.monotonic() - since:.0f} s"
        return None

    def next_batch(self) -> list[Item]:
        """Block until work exists, then take what is waiting (see the module docstring): a
        waiting suspect alone, else the items."""
        with self._cond:
            while not self._items and not self._suspects and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            if self._suspects:
                return [self._suspects.popleft()]
            backlog = self._messages > 1
            batch = self._take()
            if backlog and self.max_wait_s > 0:
                deadline = time.monotonic() + self.max_wait_s
                while len(batch) < self.max_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if not self._items:
                        self._cond.wait(left)
                    batch += self._take(self.max_size - len(batch))
            return batch

    def _take(self, limit: int | None = None) -> list[Item]:
        n = min(len(self._items), self.max_size if limit is None else limit)
        taken = [self._items.popleft() for _ in range(n)]
        if not self._items:
            self._messages = 0
        return taken

    def _run(self) -> None:
        setthreadtitle(MODEL_THREAD)  # as _named_thread does for the store and claim threads
        ahead: tuple[list[Item], Future[Claim]] | None = None
        while True:
            self._busy_since = None  # waiting for work is no stall
            claiming: Future[Claim] | None = None
            alone = False
            if ahead is not None:
                # Claimed while the model ran the last batch; it runs even when stopping, since
                # its jobs are taken.
                batch, claiming = ahead
                ahead = None
            else:
                batch = self.next_batch()
                if not batch:
                    return  # stopping
                alone = batch[0].suspect
            self._busy_since = time.monotonic()
            self._post_slots.acquire()
            claim: Claim | None = None
            try:
                if alone:  # a suspect: the batches before it are stored before it is claimed
                    self._drain()
                # A suspect is claimed only from the reconciler's marked message (`alone`): a
                # stray unmarked copy would claim it before the batches ahead were stored.
                claim = (
                    claiming.result()
                    if claiming is not None
                    else self.segmenter.claim([item.job_id for item in batch], suspects=alone)
                )
                if not alone:
                    ahead = self._claim_ahead()
                inferred = self.segmenter.forward(claim)
            except Exception:
                self._post_slots.release()
                log.exception("batch of %d failed before its results; requeued", len(batch))
                if claim is not None:  # the forward pass failed: give its claimed jobs back
                    self._release(claim)
                _settle(batch, ok=False)
                time.sleep(RETRY_PAUSE_S)
                continue
            try:
                stored = self._post.submit(self._store, batch, inferred)
            except RuntimeError:  # close() stopped waiting for this batch and shut the pools
                self._post_slots.release()
                log.error("worker closed during a batch of %d; released and requeued", len(batch))
                self._release(inferred)
                _settle(batch, ok=False)
                if ahead is not None:
                    self._give_back(*ahead)
                return
            if alone:  # nothing else is claimed or run until the suspect is stored
                wait([stored])

    def _drain(self) -> None:
        """Wait until every batch handed to the store thread is stored (it runs them in order)."""
        self._post.submit(_nothing).result()

    def _claim_ahead(self) -> tuple[list[Item], Future[Claim]] | None:
        """Start claiming the next batch now if a full one is already waiting: it will be the
        same batch whenever it is formed, and its claim (a database round trip carrying 48 KiB
        of input per job, ~7% of a batch's time) then runs beside the model, not before it.
        With less waiting, the next batch still forms when the model is free, as large as
        it can be."""
        with self._cond:
            # A waiting suspect goes next, alone: a batch claimed now would run before it.
            if self._stopping or self._suspects or len(self._items) < self.max_size:
                return None
            batch = self._take()
        try:
            ids = [item.job_id for item in batch]
            return batch, self._claimer.submit(self.segmenter.claim, ids, suspects=False)
        except RuntimeError:  # the claim pool is shut down: close() gave up on this thread
            _settle(batch, ok=False)
            return None

    def _give_back(self, batch: list[Item], claiming: Future[Claim]) -> None:
        """Release a batch claimed ahead that will not run, and requeue its messages."""
        try:
            self._release(claiming.result())
        except Exception:  # its claim failed: nothing is leased
            log.warning("the claim of a batch given back failed", exc_info=True)
        _settle(batch, ok=False)

    def _store(self, batch: list[Item], inferred: Inferred) -> None:
        try:
            counts = self.segmenter.store(inferred)
            log.info("batch of %d messages: %s", len(batch), counts)
            _settle(batch, ok=True)
        except Exception:
            log.exception("storing a batch of %d failed; released and requeued", len(batch))
            # Like a failed forward pass, pause first (holding this slot, so the model thread
            # slows down too): a storage outage must not spin claim, run, fail, release.
            time.sleep(RETRY_PAUSE_S)
            self._release(inferred)
            _settle(batch, ok=False)
        finally:
            self._post_slots.release()

    def _release(self, batch: Claim | Inferred) -> None:
        """Give a failed batch's claimed jobs back to the queue before its messages are
        requeued, so the redelivered messages can claim them again at once (without this they
        would find the jobs leased, be acknowledged, and wait for the reconciler, which counts
        each such round as a lost attempt). The release waits for locks and retries until the
        lease would expire, so a database stall that failed the batch does not count too."""
        try:
            self.segmenter.release(batch)
        except Exception:  # not even by the lease's end: the reconciler picks the jobs up
            log.exception("releasing the batch failed too")


def _named_thread(name: str) -> ThreadPoolExecutor:
    """A one-thread pool whose thread carries `name` into the OS too (`top -H`, `ps -L`,
    /proc/<pid>/task), so an operator or `make bench` can see what each stage spends."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=name, initializer=setthreadtitle, initargs=(name,)
    )


def _nothing() -> None:
    """A store-thread task that marks the point where the batches before it are stored."""


def _settle(batch: list[Item], *, ok: bool) -> None:
    for item in batch:
        try:
            item.ack() if ok else item.requeue()
        except Exception:  # a closed connection: the broker redelivers, the claim fences it
            log.warning("could not settle the message of job %s", item.job_id, exc_info=True)
