"""Celery tasks: thin wrappers that load by id and call the Segmenter."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from celery import Celery, Task, bootsteps, signals

from segsvc.queue import RUN_JOB, SUSPECT_KWARG
from worker.batcher import Item, MicroBatcher
from worker.celery_app import app, settings
from worker.segmenter import Segmenter

log = logging.getLogger(__name__)

_segmenter: Segmenter | None = None
_batcher: MicroBatcher | None = None
_lock = threading.Lock()
_prefetch_lock = threading.Lock()


def get_segmenter() -> Segmenter:
    """The process's one Segmenter (created lazily, after any fork)."""
    global _segmenter
    with _lock:
        if _segmenter is None:
            _segmenter = Segmenter(settings)
        return _segmenter


def current_batcher() -> MicroBatcher | None:
    """The process's MicroBatcher if one was started (never starts one)."""
    return _batcher


def get_batcher() -> MicroBatcher:
    """The process's one MicroBatcher (its threads start on first use)."""
    global _batcher
    segmenter = get_segmenter()
    with _lock:
        if _batcher is None:
            _batcher = MicroBatcher(
                segmenter,
                max_size=settings.batch_max_size,
                max_wait_s=settings.batch_max_wait_ms / 1000.0,
            )
        return _batcher


class MicroBatchTask(Task):  # type: ignore[misc]
    """A task whose delivered messages go to the MicroBatcher instead of the execution pool.

    The consumer loop only parses the job id and buffers it; acks are sent after the batch's
    results are committed (acks_late), through the consumer's own (thread-safe) ack promise.
    """

    def Strategy(self, task: Task, app: Celery, consumer: Any) -> Any:  # Celery's name
        from worker.observability import consumes_inference

        # Only a worker of the inference queue starts the pipeline up front (the maintenance
        # worker, of the same app, registers this task too but never gets its messages).
        started = get_batcher() if consumes_inference(app) else None
        errors = consumer.connection_errors

        def on_message(message: Any, body: Any, ack: Any, reject: Any, *_: Any, **__: Any) -> None:
            batcher = started or get_batcher()
            job_ids, suspect = _arguments(message, body)
            if not job_ids:
                # An exception here would stop the worker (Celery takes any error of a strategy
                # other than an invalid task as unrecoverable), and the message, restored,
                # would then stop every worker in turn: a malformed one is dropped instead.
                log.warning("dropping a %s message without a job id: %.200r", RUN_JOB, body)
                ack(log, errors)
                return
            qos = consumer.qos  # this connection's: a restart's new one is not given back to
            held = hold_prefetch(qos, len(job_ids) - 1)
            settle = SharedSettle(
                len(job_ids),
                ack=partial(ack, log, errors),
                requeue=partial(reject, log, errors, True),
                settled=partial(give_back_prefetch, qos, held) if held else None,
            )
            # A batch submit's jobs may land in different batches.
            batcher.put_many(
                [
                    Item(job_id, ack=settle.ack, requeue=settle.requeue, suspect=suspect)
                    for job_id in job_ids
                ]
            )

        return on_message


def hold_prefetch(qos: Any, extra: int) -> int:
    """Count a message's `extra` job ids (beyond its first) against the consumer's prefetch,
    so that prefetch bounds the jobs a worker holds, not the messages: a batch submit's one
    message carries up to 16. Counted by messages, one worker took 96 of them (up to 1536
    jobs) while workers KEDA had just added found the queue empty. Returns what was taken
    (prefetch never drops below 1: a message larger than it still runs, alone); the consumer
    loop applies the new value before it fetches again, and the message's settling gives it
    back (`SharedSettle`)."""
    if extra <= 0:
        return 0
    # Celery's event loop swaps the QoS lock for a no-op (it changes the value from its own
    # thread only), while the store thread gives prefetch back: this lock orders the two.
    with _prefetch_lock:
        before = qos.value
        return int(before - qos.decrement_eventually(extra))


def give_back_prefetch(qos: Any, held: int) -> None:
    """Return what `hold_prefetch` took, once the message is settled."""
    with _prefetch_lock:
        qos.increment_eventually(held)


class SharedSettle:
    """Settles one message that carries `count` job ids once every id is settled: acknowledged
    when all were stored, requeued when any was not (stored ids are no-ops when it returns);
    then `settled`, if given (the prefetch the message held, given back)."""

    def __init__(
        self,
        count: int,
        *,
        ack: Callable[[], Any],
        requeue: Callable[[], Any],
        settled: Callable[[], Any] | None = None,
    ) -> None:
        self._left = count
        self._failed = False
        self._ack, self._requeue, self._settled = ack, requeue, settled
        self._lock = threading.Lock()

    def ack(self) -> None:
        self._settle(ok=True)

    def requeue(self) -> None:
        self._settle(ok=False)

    def _settle(self, *, ok: bool) -> None:
        with self._lock:
            self._left -= 1
            self._failed |= not ok
            if self._left != 0:
                return
        (self._requeue if self._failed else self._ack)()
        if self._settled is not None:
            self._settled()


def _arguments(message: Any, body: Any) -> tuple[list[str], bool]:
    """The job ids a message carries (its arguments, in either protocol; none when it is
    malformed: a body that is not a task's, arguments that are not a list), and whether the
    reconciler sent it as a suspect's."""
    try:
        payload = body if body is not None else message.decode()
    except Exception:  # an undecodable body: nothing in it can be run
        log.warning("a %s message could not be decoded", RUN_JOB, exc_info=True)
        return [], False
    if isinstance(payload, dict):  # protocol 1
        args, kwargs = payload.get("args"), payload.get("kwargs")
    elif isinstance(payload, list | tuple) and payload:  # protocol 2: [args, kwargs, embed]
        args, kwargs = payload[0], payload[1] if len(payload) > 1 else None
    else:
        return [], False
    if not isinstance(args, list | tuple):
        return [], False
    suspect = isinstance(kwargs, dict) and kwargs.get(SUSPECT_KWARG) is True
    return [str(arg) for arg in args], suspect


@app.task(name=RUN_JOB, base=MicroBatchTask, acks_late=True)
def run_job(*job_ids: str, suspect: bool = False) -> dict[str, int]:
    """Run jobs now as one batch (a direct call; a worker batches messages through the
    MicroBatcher, and runs a `suspect`'s alone). Duplicate ids and finished jobs are no-ops."""
    return get_segmenter().run_jobs(list(job_ids))


class CloseBatcherFirst(bootsteps.StartStopStep):  # type: ignore[misc]
    """Warm shutdown: finish and store the batch in flight, and acknowledge its messages,
    while the broker channel is still open.

    A consumer step placed after Tasks, closed when the consumer stops for good (`close` is
    not called when it restarts after a lost connection). Celery's own order closed the
    channel first (Tasks.stop), which put the unacknowledged batch back on the queue for a
    peer to take while its jobs were still leased, and sent `worker_shutdown` (where this ran
    before) only after: the batch's acks went nowhere."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def close(self, c: Any) -> None:
        if _batcher is None:
            return
        _batcher.close()
        # The batch's acks were handed to the event loop (call_soon), which no longer turns:
        # send them now, on the channel that is still open (kombu's Hub.close does the same,
        # but only after the channel is gone).
        hub = getattr(c, "hub", None)
        if hub is None:  # a transport without an event loop (make run's SQLAlchemy one)
            c.perform_pending_operations()
            return
        for callback in hub._pop_ready():
            try:
                callback()
            except Exception:  # one failed ack must not stop the others
                log.warning("an acknowledgement at shutdown failed", exc_info=True)


app.steps["consumer"].add(CloseBatcherFirst)


def _close_batcher(**_: Any) -> None:
    """Shutdown before the consumer fully started (no `CloseBatcherFirst.close`): finish
    what the batcher holds anyway. Closing twice is harmless."""
    if _batcher is not None:
        _batcher.close()


signals.worker_shutdown.connect(_close_batcher)  # not a decorator: Celery's are untyped
