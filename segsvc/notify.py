"""Job-finished notices over Redis pub/sub, so a client can long-poll `GET /v1/jobs/<id>?wait=`.

Best effort by design: Postgres stays the source of truth. A waiter re-reads the job after every
notice and at least once a second, so a lost notice (Redis restart, a path that does not publish,
the embedded default without Redis) only costs latency, never a wrong answer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Protocol

import redis

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "segsvc:job:"
FALLBACK_RECHECK_S = 1.0  # with Redis: re-read the job this often even without a notice
POLL_WITHOUT_REDIS_S = 0.1  # without Redis: re-read the job this often

_clients: dict[tuple[int, str], redis.Redis] = {}
_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


@contextmanager
def waiter_slot(limit: int) -> Iterator[bool]:
    """One of `limit` long-poll slots of this process, if free (never blocks).

    A waiting request holds a server thread; past the limit a poll is answered at once and the
    client polls again, so waiters can never take every thread from submits.
    """
    if limit <= 0:
        yield False
        return
    with _slots_lock:
        slots = _slots.setdefault(limit, threading.BoundedSemaphore(limit))
    if not slots.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        slots.release()


def _client(url: str) -> redis.Redis:
    """One client per process and URL, with short timeouts (notices must never stall work)."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=0.5)
    return _clients[key]


def channel(job_id: uuid.UUID | str) -> str:
    """The pub/sub channel of one job."""
    return f"{CHANNEL_PREFIX}{job_id}"


def publish_finished(redis_url: str | None, job_ids: Iterable[uuid.UUID | str]) -> None:
    """Tell waiters these jobs reached a terminal state (after the commit that ended them)."""
    ids = list(job_ids)
    if not redis_url or not ids:
        return
    try:
        pipe = _client(redis_url).pipeline(transaction=False)
        for job_id in ids:
            pipe.publish(channel(job_id), b"done")
        pipe.execute()
    except redis.RedisError as exc:  # waiters fall back to re-reading the job
        log.warning("could not publish job notices: %s", exc.__class__.__name__)


class Subscription(Protocol):
    def wait(self, seconds: float) -> None:
        """Return on a notice for the job, or after `seconds`."""
        ...


class _RedisSubscription:
    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            except redis.RedisError:
                time.sleep(min(left, POLL_WITHOUT_REDIS_S))
                return
            if message is not None:
                return


class _Sleep:
    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def wait(self, seconds: float) -> None:
        time.sleep(min(seconds, self._seconds))


@contextmanager
def subscribe(
    redis_url: str | None, job_id: uuid.UUID | str
) -> Iterator[tuple[Subscription, float]]:
    """A subscription to one job's notices and how often to re-read the job regardless.

    Subscribe *before* reading the job's state, so a notice sent in between is not missed.
    """
    if not redis_url:
        yield _Sleep(POLL_WITHOUT_REDIS_S), POLL_WITHOUT_REDIS_S
        return
    try:
        pubsub = _client(redis_url).pubsub(  # type: ignore[no-untyped-call]
            ignore_subscribe_messages=True
        )
        pubsub.subscribe(channel(job_id))
    except redis.RedisError:
        yield _Sleep(POLL_WITHOUT_REDIS_S), POLL_WITHOUT_REDIS_S
        return
    try:
        yield _RedisSubscription(pubsub), FALLBACK_RECHECK_S
    finally:
        with suppress(redis.RedisError):
            pubsub.close()
