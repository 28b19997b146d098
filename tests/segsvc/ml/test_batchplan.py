"""The batch planner: cheapest call sequence from measured call times, padding included."""

from __future__ import annotations

import itertools
import random

import pytest

from segsvc.ml.batchplan import BatchPlanner

# ms per call measured with one thread on an earlier Intel Xeon host (litert-int8), where b5-b7
# calls are cheaper than b4 (compare bench/results/2026-11-26T062748Z.json).
XEON = {1: 10.5, 2: 21.4, 3: 32.7, 4: 44.5, 5: 21.9, 6: 26.8, 7: 31.3, 8: 39.5, 32: 192.0}
# About 9 ms per image from b4 up, 11 below (the AMD EPYC of the earlier runs).
FLAT = {1: 11.0, 2: 22.0, 4: 36.0, 8: 72.0, 32: 288.0}


def brute_force(seconds: dict[int, float], n: int) -> float:
    """The cheapest cost over every multiset of calls covering n images (small n only)."""
    best = float("inf")
    for calls in range(1, n + 1):
        for combo in itertools.combinations_with_replacement(sorted(seconds), calls):
            if sum(combo) >= n and sum(combo) - min(combo) < n:  # no call is wholly padding
                best = min(best, sum(seconds[s] for s in combo))
    return best


@pytest.mark.parametrize("table", [XEON, FLAT])
def test_plan_covers_the_batch_at_the_lowest_cost(table: dict[int, float]) -> None:
    planner = BatchPlanner(table)
    for n in range(1, 11):
        plan = planner.plan(n)
        assert sum(plan) >= n
        assert sum(plan) - min(plan) < n  # at most the last call is padded
        assert planner.cost(n) == pytest.approx(brute_force(table, n))


def test_plan_replaces_a_slow_small_size_with_a_padded_faster_one() -> None:
    planner = BatchPlanner(XEON)
    assert planner.plan(1) == (1,)
    assert planner.plan(4) == (5,)  # one b5 call with a zero image: 21.9 ms, not 44.5
    assert planner.plan(9) == (5, 5)
    assert 32 not in planner.plan(32)  # six calls of 5-7 images beat one b32 call
    assert planner.cost(32) < XEON[32]
    assert planner.used_sizes(32).isdisjoint({3, 4, 32})


def test_plan_breaks_ties_by_padding_then_calls() -> None:
    planner = BatchPlanner(FLAT)
    assert planner.plan(32) == (32,)
    assert planner.plan(8) == (8,)
    assert planner.plan(3) == (2, 1)  # 33 ms, where a padded b4 costs 36
    assert BatchPlanner({1: 1.0, 4: 4.0}).plan(4) == (4,)


def test_plan_runs_batches_beyond_the_largest_size_as_blocks() -> None:
    planner = BatchPlanner(FLAT)
    assert planner.plan(70) == (32, 32, 4, 2)
    assert planner.plan(0) == ()


def test_planner_refuses_an_empty_or_invalid_table() -> None:
    with pytest.raises(ValueError, match="positive"):
        BatchPlanner({}).plan(1)
    with pytest.raises(ValueError, match="positive"):
        BatchPlanner({0: 1.0}).plan(1)


def random_tables(count: int) -> list[dict[int, float]]:
    """Cost tables of every shape: cheap large sizes, expensive large sizes, gaps, ties."""
    rng = random.Random(7)
    tables: list[dict[int, float]] = [XEON, FLAT, {1: 1.0, 5: 1.0, 9: 10.0}, {3: 1.0}, {1: 0.0}]
    for _ in range(count):
        sizes = rng.sample(range(1, 40), rng.randint(1, 6))
        tables.append({size: rng.choice([0.0, 1.0, rng.uniform(0.1, 50.0)]) for size in sizes})
    return tables


def test_plan_always_covers_exactly_with_only_the_last_call_padded() -> None:
    """The runtime slices the calls in plan order: every call but the last must be full, or
    the batch gets rows of padding (seven b5 calls for 29 images returned 33 rows)."""
    for table in random_tables(200):
        planner = BatchPlanner(table)
        for n in [*range(1, 3 * max(table) + 2), 97, 130]:
            plan = planner.plan(n)
            assert list(plan) == sorted(plan, reverse=True)
            assert sum(plan) - plan[-1] < n <= sum(plan), (table, n, plan)


def test_plan_beyond_the_largest_size_is_not_built_from_padded_blocks() -> None:
    planner = BatchPlanner({1: 1.0, 5: 1.0, 9: 10.0})
    assert planner.plan(9) == (5, 5)  # the largest size's own plan pads one image
    assert planner.plan(29) == (5, 5, 5, 5, 5, 5)
    assert planner.cost(29) == 6.0


def test_planner_refuses_negative_call_times() -> None:
    with pytest.raises(ValueError, match="negative"):
        BatchPlanner({1: -1.0}).plan(1)
