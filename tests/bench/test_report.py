"""bench/report.py: which rows are the issue's targets and which are shown for reference."""

from __future__ import annotations

from bench.report import met_cell
from tests.conftest import ROOT


def test_reference_rows_are_bracketed_and_the_targets_are_not() -> None:
    reference = {"target": "x / raw batched as served (1 thread)", "met": True}
    target = {"target": "x / raw batched on all cores", "met": False}
    idle = {"target": "idle latency p50 - raw b1 latency as served (ms, <=)", "met": True}
    assert (met_cell(reference), met_cell(target), met_cell(idle)) == ("(yes)", "**no**", "yes")


def test_the_submit_target_is_against_the_faster_hello_and_references_are_bracketed() -> None:
    """The submit is held to the faster of the plain hello and the one that parses the upload
    (gunicorn makes the plain one reconnect when it leaves an upload unread); the other is a
    reference row. Rows that are not the issue's own targets (the float32 runtime against the
    float32 limit, the closed-loop run, the runtime as served) are bracketed, never counted as
    met or missed."""
    import json

    from bench import report

    r = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    r["api_submit"] = {**r["api_submit"], "jobs_per_s": 300.0}
    for plain, upload, faster, other in (
        (2000.0, 1000.0, "plain hello", "hello that parses the upload"),
        (1000.0, 2000.0, "hello that parses the upload", "plain hello"),
    ):
        r["hello"] = {**r["hello"], "jobs_per_s": plain}
        r["hello_upload"] = {**r["hello"], "jobs_per_s": upload}
        targets = {t["target"]: t for t in report.targets(r)}
        target = targets[f"API submit / the faster hello ({faster}) requests/s"]
        assert target["measured"] == 300.0 / 2000.0
        assert not report.met_cell(target).startswith("(")
        reference = targets[f"(reference) API submit / {other}"]
        assert reference["measured"] == 300.0 / 1000.0
        assert report.met_cell(reference) == "(yes)"
        assert [t for t in targets if t.startswith("API submit / ")] == [target["target"]]
    references = [t for t in targets.values() if t.get("reference")]
    assert any("float32 runtime" in t["target"] for t in references)
    assert any("closed loop" in t["target"] for t in references)
    assert all(report.met_cell(t).startswith("(") for t in references)
