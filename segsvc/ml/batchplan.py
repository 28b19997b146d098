"""Which fixed-size LiteRT calls run a batch of n images, from each size's measured time.

XNNPACK's speed per image is not monotonic in the batch size, and where it jumps depends on the
CPU: with one thread on an Intel Xeon (AVX-512 VNNI) b1 to b4 cost about 10.5 ms per image and
b5 to b7 about 4.4, while b32 costs 6.0; on an AMD EPYC b1 and b2 cost about 11 and b4 to b32
about 9. So the worker times each size once when it loads a model and runs every batch as the
cheapest sequence of calls, padding the last one when a larger call is faster (a batch of 4
runs as one b5 call with a zero image here: 22 ms instead of 45). Images never affect each
other's results, padding included: LiteRT quantizes activations per image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class BatchPlanner:
    """Cheapest call sequence per batch size, from `seconds` (call time by fixed size)."""

    seconds: Mapping[int, float]

    def plan(self, n: int) -> tuple[int, ...]:
        """Fixed sizes to call for `n` images, largest first: every call but the last is full
        and the last may be padded, so sum(plan) - min(plan) < n <= sum(plan). Batches beyond
        the largest size are planned the same way (the table grows to `n`)."""
        if n <= 0:
            return ()
        table = self._table
        if n >= len(table):
            self._extend(table, n)
        return table[n]

    def cost(self, n: int) -> float:
        """Planned seconds for `n` images."""
        return sum(self.seconds[size] for size in self.plan(n))

    def used_sizes(self, up_to: int) -> set[int]:
        """Every size some batch of 1..`up_to` images calls (the others need no interpreter)."""
        return {size for n in range(1, up_to + 1) for size in self.plan(n)}

    @cached_property
    def _table(self) -> list[tuple[int, ...]]:
        """Plans for 0..largest size (see `_extend`)."""
        if not self.seconds or min(self.seconds) < 1:
            raise ValueError("batch sizes must be positive")
        if min(self.seconds.values()) < 0:
            raise ValueError("call times must not be negative")
        table: list[tuple[int, ...]] = [()]
        self._extend(table, max(self.seconds))
        return table

    def _extend(self, table: list[tuple[int, ...]], up_to: int) -> None:
        """Append plans up to `up_to` images: best[m] = min over sizes s of seconds[s] +
        best[m - s], where a size above m pads. Ties go to fewer padded images, then to fewer
        calls. This is the cheapest cover of m, and with costs >= 0 it never holds a call that
        is wholly padding (dropping it would cost no more and pad less)."""
        best = self._best
        while len(table) <= up_to:
            m = len(table)
            options = []
            for size, secs in self.seconds.items():
                cost, padded, calls, chunks = best[max(0, m - size)]
                options.append(
                    (
                        cost + secs,
                        padded + max(0, size - m),
                        calls + 1,
                        tuple(sorted((*chunks, size), reverse=True)),
                    )
                )
            best.append(min(options))
            table.append(best[-1][3])

    @cached_property
    def _best(self) -> list[tuple[float, int, int, tuple[int, ...]]]:
        return [(0.0, 0, 0, ())]
