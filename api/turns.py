"""Turns for work that must not run too many at once in one API process: large decodes, batch
submits, overlays. Each is served in the order asked, so one client's stream of requests cannot
keep overtaking another's; a request that waits too long gives its thread back with a 503."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from segsvc.errors import SegError, UnavailableError


class Slots(Protocol):
    """What `turn` takes turns on: a semaphore, a lock, or a `FairTurn`."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


class FairTurn:
    """Up to `holders` at a time (one by default), served in the order they asked. With a
    semaphore, a request that asks just as a turn is released takes it before the waiter woken
    for it runs: one client's back-to-back large overlays kept another client's large upload
    waiting past its 10 s, then a 503."""

    def __init__(self, holders: int = 1) -> None:
        self._lock = threading.Lock()
        self._waiting: deque[threading.Event] = deque()
        self._free = holders

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return True
            if not blocking:
                return False
            mine = threading.Event()
            self._waiting.append(mine)
        if mine.wait(timeout):
            return True
        with self._lock:
            if mine.is_set():  # handed over as the wait ran out: it is this one's
                return True
            self._waiting.remove(mine)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # handed to the first in line: still held
            else:
                self._free += 1


@contextmanager
def turn(slots: Slots, wait_s: float, busy: type[SegError], message: str) -> Iterator[None]:
    """One of `slots` for the block, waited for up to `wait_s`; else `busy` (a 503, retry in
    1 s): the request gives its thread back instead of queueing for ever."""
    if not slots.acquire(timeout=wait_s):
        raise busy(message, retry_after=1)
    try:
        yield
    finally:
        slots.release()


class KeyTurns:
    """Per key, one request in the process's turn (or waiting for it) at a time, each of its
    others waiting behind it (then `busy`, 503), at most `queue` of them; past those, `pending`
    (429): the key is told to slow down, not given more threads."""

    def __init__(
        self, *, queue: int, busy: type[SegError], pending: type[SegError], what: str
    ) -> None:
        self.queue, self.busy, self.pending, self.what = queue, busy, pending, what
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[threading.Lock, int]] = {}  # key -> (its turn, waiting)

    @contextmanager
    def hold(self, key: str | None, wait_s: float) -> Iterator[None]:
        """`key`'s turn, after its earlier requests: each waited for up to `wait_s`. No key
        (authentication off): no per-key turn."""
        if key is None:
            yield
            return
        with self._lock:
            own, waiting = self._keys.get(key, (threading.Lock(), 0))
            if waiting > self.queue:
                raise self.pending(
                    f"This key has {waiting} {self.what} being handled or waiting on this "
                    "server already; send more when those have been answered.",
                    retry_after=1,
                )
            self._keys[key] = (own, waiting + 1)
        try:
            with turn(
                own,
                wait_s,
                self.busy,
                f"This key's other {self.what} kept this server busy; retry shortly.",
            ):
                yield
        finally:
            with self._lock:
                own, waiting = self._keys[key]
                if waiting > 1:
                    self._keys[key] = (own, waiting - 1)
                else:
                    del self._keys[key]


class PixelBudget:
    """Pixels of full-size decodes in flight in this process, up to a budget: a request holds
    its picture's (up to the whole budget) for its decode, waiting up to `wait_s` for them.
    Served in the order asked, as `FairTurn`: waiters all woken on each release, whichever
    fitted first winning, let one key's stream of overlays keep overtaking another key's,
    which waited, then got a 503."""

    def __init__(self, pixels: int, *, busy: type[SegError] = UnavailableError) -> None:
        self.total = pixels
        self.busy = busy
        self._free = pixels
        self._lock = threading.Lock()
        self._waiting: deque[tuple[int, threading.Event]] = deque()

    @contextmanager
    def hold(self, pixels: int, wait_s: float) -> Iterator[None]:
        need = min(pixels, self.total)
        if not self._acquire(need, wait_s):
            raise self.busy(
                "This server is drawing as many overlays as it takes at once; retry shortly.",
                retry_after=1,
            )
        try:
            yield
        finally:
            with self._lock:
                self._free += need
                self._hand_over()

    def _acquire(self, need: int, wait_s: float) -> bool:
        with self._lock:
            if not self._waiting and self._free >= need:
                self._free -= need
                return True
            mine = (need, threading.Event())
            self._waiting.append(mine)
        if mine[1].wait(wait_s):
            return True
        with self._lock:
            if mine[1].is_set():  # handed over as the wait ran out: they are this one's
                return True
            self._waiting.remove(mine)
            self._hand_over()  # those behind it may fit now
            return False

    def _hand_over(self) -> None:
        """Give the free pixels to the waiters in line, first come first (the lock held)."""
        while self._waiting and self._waiting[0][0] <= self._free:
            need, handed = self._waiting.popleft()
            self._free -= need
            handed.set()
