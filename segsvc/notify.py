"""Job-finished notices over Redis pub/sub, so a client can long-poll `GET /v1/jobs/<id>?wait=`.

Best effort by design: Postgres stays the source of truth. A waiter re-reads the job after every
notice and at least once a second, so a lost notice (Redis restart, a path that does not publish,
the embedded default without Redis) only costs latency, never a wrong answer.

One message per finished batch goes to one channel (`publish_finished`), and each process holds
one subscription to it (`_Listener`, a daemon thread started on the first long poll) that wakes
the waiting requests by job id: a long poll costs no Redis round trip of its own. A notice may
carry a job's end state (the columns its ending wrote, as committed), so the woken request can
answer without reading the job again; one without (a bare id) has it re-read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, Protocol

import redis

log = logging.getLogger(__name__)

CHANNEL = "segsvc:jobs-finished"
FALLBACK_RECHECK_S = 1.0  # with Redis: re-read the job this often even without a notice
POLL_WITHOUT_REDIS_S = 0.1  # without Redis: re-read the job this often
SUBSCRIBE_WAIT_S = 0.5  # the longest a process's first long poll waits for its subscription
RECONNECT_PAUSE_S = 1.0
# A quiet subscription is asked a PING after this long, and given up on (woken waiters re-read,
# then it reconnects) when no answer comes within PONG_TIMEOUT_S: a connection a NAT or a failed
# over Redis dropped without a word is otherwise waited on until TCP keepalive (2 h by default)
# while every notice is lost.
QUIET_PING_S = 30.0
PONG_TIMEOUT_S = 10.0

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


def channel(redis_url: str) -> str:
    """The notices' channel; pub/sub ignores the database number, so it is part of the name."""
    db = redis.connection.parse_url(redis_url).get("db", 0)  # type: ignore[no-untyped-call]
    return f"{CHANNEL}:{db}"


State = Mapping[str, Any]  # a job's end state as a notice carries it (JSON-able)


def publish_finished(
    redis_url: str | None,
    job_ids: Iterable[uuid.UUID | str],
    states: Mapping[str, State] | None = None,
) -> None:
    """Tell waiters these jobs reached a terminal state (after the commit that ended them);
    `states` (by job id, for some or all) is what those commits wrote, handed to the waiters."""
    ids = [str(job_id) for job_id in job_ids]
    if not redis_url or not ids:
        return
    states = states or {}
    message = json.dumps({job_id: states.get(job_id) for job_id in ids}, separators=(",", ":"))
    try:
        _client(redis_url).publish(channel(redis_url), message)
    except redis.RedisError as exc:  # waiters fall back to re-reading the job
        log.warning("could not publish job notices: %s", exc.__class__.__name__)


def parse_notice(data: bytes) -> dict[str, State | None]:
    """A notice's job ids and end states (None: re-read the job). Also the bare comma-separated
    ids of releases before end states were sent, so a rolling upgrade loses no wake-up."""
    if data[:1] != b"{":
        return dict.fromkeys(data.decode().split(","))
    parsed = json.loads(data)
    if not isinstance(parsed, dict):
        raise ValueError("a notice is a JSON object")
    return {str(k): v if isinstance(v, dict) else None for k, v in parsed.items()}


class Subscription(Protocol):
    def wait(self, seconds: float) -> dict[str, State] | None:
        """Return on a notice for one of the jobs, or after `seconds`: the end states the
        notices since the last wait carried, by job id, or None when the jobs must be read
        (the time ran out, or a notice came without its state)."""
        ...


class _Sleep:
    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def wait(self, seconds: float) -> dict[str, State] | None:
        time.sleep(min(seconds, self._seconds))
        return None


class _Notice:
    """A waiter's event and the end states delivered with it; set by the listener."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._states: dict[str, State] = {}
        self._reread = False  # a wake-up came without an end state

    def set(self, job_id: str | None = None, state: State | None = None) -> None:
        with self._lock:
            if job_id is None or state is None:
                self._reread = True
            else:
                self._states[job_id] = state
        self._event.set()

    def wait(self, seconds: float) -> dict[str, State] | None:
        woken = self._event.wait(seconds)
        self._event.clear()
        with self._lock:
            states, reread = self._states, self._reread
            self._states, self._reread = {}, False
        return states if woken and not reread else None


class _Listener:
    """This process's one subscription: a daemon thread that wakes waiters by job id."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._channel = channel(redis_url)
        self.client_name = f"segsvc-notices-{os.getpid()}"
        self._waiters: dict[str, set[_Notice]] = {}
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.tried = threading.Event()  # the first connection attempt has ended, either way
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segsvc-notices", daemon=True)
        self._thread.start()

    def add(self, job_ids: Iterable[str]) -> _Notice:
        """One notice, set by a notice for any of `job_ids`."""
        notice = _Notice()
        with self._lock:
            for job_id in job_ids:
                self._waiters.setdefault(job_id, set()).add(notice)
        return notice

    def remove(self, job_ids: Iterable[str], notice: _Notice) -> None:
        with self._lock:
            for job_id in job_ids:
                waiting = self._waiters.get(job_id)
                if waiting is not None:
                    waiting.discard(notice)
                    if not waiting:
                        del self._waiters[job_id]

    def _wake(self, ended: Mapping[str, State | None]) -> None:
        with self._lock:
            woken = [(n, job_id) for job_id in ended for n in self._waiters.get(job_id, ())]
        for notice, job_id in woken:
            notice.set(job_id, ended[job_id])

    def _wake_all(self) -> None:
        with self._lock:
            notices = [n for waiting in self._waiters.values() for n in waiting]
        for notice in notices:
            notice.set()

    def close(self) -> None:
        """Stop listening (within a second); waiters still registered are woken to re-read."""
        self._closed.set()
        self._thread.join(5)

    def _run(self) -> None:
        reported = False  # this outage was logged already (once, not on every retry)
        while not self._closed.is_set():
            try:
                self._listen()
            except Exception as exc:  # Redis went away: waiters re-read, then we reconnect
                if self.subscribed.is_set():
                    reported = False  # this attempt had worked: a new outage
                if not reported:
                    log.warning("job notices interrupted: %s", exc.__class__.__name__)
                    reported = True
            self.tried.set()
            self.subscribed.clear()
            self._wake_all()
            time.sleep(RECONNECT_PAUSE_S)

    def _listen(self) -> None:
        client = redis.Redis.from_url(
            self._url,
            socket_connect_timeout=0.5,
            socket_timeout=PONG_TIMEOUT_S,  # a write to a dead peer does not block for ever
            socket_keepalive=True,
            client_name=self.client_name,  # visible in CLIENT LIST
        )
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._channel)
            heard, pinged = time.monotonic(), None
            while not self._closed.is_set():
                message = pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is None:  # quiet: is anyone still there?
                    if pinged is not None and now - pinged > PONG_TIMEOUT_S:
                        raise redis.ConnectionError("no answer to a PING: the connection is dead")
                    if pinged is None and now - heard > QUIET_PING_S:
                        pubsub.ping()
                        pinged = now
                    continue
                heard, pinged = now, None
                if message["type"] == "subscribe":
                    self.subscribed.set()  # from here on no notice can be missed
                    self.tried.set()
                elif message["type"] == "message":
                    try:
                        ended = parse_notice(message["data"])
                    except ValueError:  # not ours; waiters re-read on their own schedule
                        log.warning("ignoring a malformed job notice")
                        continue
                    self._wake(ended)
        finally:
            with suppress(redis.RedisError):
                pubsub.close()
                client.close()


_listeners: dict[tuple[int, str], _Listener] = {}
_listeners_lock = threading.Lock()
_stopping = threading.Event()


def stop_waiting() -> None:
    """This process is shutting down: every long poll answers now, as it stands (a submit with
    `?wait=` its 202), and new ones do not wait, so no answer is cut off by the server's
    shutdown deadline after its job was stored."""
    _stopping.set()
    with _listeners_lock:
        listeners = list(_listeners.values())
    for listener in listeners:
        listener._wake_all()


def stopping() -> bool:
    """True once `stop_waiting` was called in this process."""
    return _stopping.is_set()


def _listener(redis_url: str) -> _Listener:
    """The process's listener for `redis_url` (a new one after a fork)."""
    key = (os.getpid(), redis_url)
    with _listeners_lock:
        if key not in _listeners:
            _listeners[key] = _Listener(redis_url)
        return _listeners[key]


@contextmanager
def subscribe(
    redis_url: str | None, *job_ids: uuid.UUID | str
) -> Iterator[tuple[Subscription, float]]:
    """A subscription to these jobs' notices (any one of them wakes it) and how often to re-read
    the jobs regardless.

    Subscribe *before* reading the jobs' state, so a notice sent in between is not missed.
    """
    if not redis_url:
        yield _Sleep(POLL_WITHOUT_REDIS_S), POLL_WITHOUT_REDIS_S
        return
    listener = _listener(redis_url)
    listener.tried.wait(SUBSCRIBE_WAIT_S)  # only the process's first long polls ever wait here
    if not listener.subscribed.is_set():
        yield _Sleep(POLL_WITHOUT_REDIS_S), POLL_WITHOUT_REDIS_S  # Redis is down: poll
        return
    keys = [str(job_id) for job_id in job_ids]
    notice = listener.add(keys)
    try:
        yield notice, FALLBACK_RECHECK_S
    finally:
        listener.remove(keys, notice)
