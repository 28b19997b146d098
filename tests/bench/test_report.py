"""bench/report.py: which rows are the issue's targets and which are shown for reference."""

from __future__ import annotations

from bench.report import met_cell


def test_reference_rows_are_bracketed_and_the_targets_are_not() -> None:
    reference = {"target": "x / raw batched as served (1 thread)", "met": True}
    target = {"target": "x / raw batched on all cores", "met": False}
    idle = {"target": "idle latency p50 - raw b1 latency as served (ms, <=)", "met": True}
    assert (met_cell(reference), met_cell(target), met_cell(idle)) == ("(yes)", "**no**", "yes")
