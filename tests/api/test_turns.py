"""api/turns.py: the turn primitives the API's routes wait on."""

from __future__ import annotations

import threading

from api.turns import KeyTurns
from segsvc.errors import RateLimitedError, UnavailableError


def _keyed() -> KeyTurns:
    return KeyTurns(queue=4, busy=UnavailableError, pending=RateLimitedError, what="things")


def _all_inside_at_once(turns: KeyTurns, key: str | None, n: int = 3) -> bool:
    """Whether `n` threads holding `key`'s turn are all inside it at once."""
    inside = threading.Barrier(n, timeout=1.0)
    broken: list[bool] = []

    def hold() -> None:
        try:
            with turns.hold(key, 2.0):
                inside.wait()
        except (threading.BrokenBarrierError, UnavailableError):
            broken.append(True)

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return not broken


def test_a_keys_requests_take_its_turn_one_at_a_time() -> None:
    assert not _all_inside_at_once(_keyed(), "key-a")


def test_without_a_key_no_per_key_turn_is_taken() -> None:
    """Authentication off, every caller is the same anonymous client: its requests queued
    behind each other as one key's (one batch per process, metered overlays one at a time
    across every caller, a 6th batch told 429 batches_pending)."""
    assert _all_inside_at_once(_keyed(), None)
