"""bench/history.py: every saved bench run's targets, side by side and per CPU kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import history, report

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def target(name: str, measured: float, required: float, met: bool) -> dict[str, Any]:
    return {"target": name, "measured": measured, "required": required, "met": met}


def run(hour: str, cpu: str, *targets: dict[str, Any]) -> dict[str, Any]:
    """A saved run of 2026-11-26 at `hour` (HH:MM)."""
    return {
        "started": f"2026-11-26T{hour}:00+00:00",
        "machine": {"cpu": cpu},
        "served_runtime": "litert-int8",
        "targets": list(targets),
    }


def save(folder: Path, data: dict[str, Any], name: str | None = None) -> None:
    if name is None:  # named as bench/run.py names a run
        name = data["started"].replace(":", "").replace("+0000", "Z") + ".json"
    (folder / name).write_text(json.dumps(data))


def test_summary_counts_targets_met_per_cpu_and_every_run_is_listed(tmp_path: Path) -> None:
    burst = "end-to-end jobs/s (burst capacity) / raw batched as served (1 thread)"
    submit = "API submit / hello requests/s"
    save(
        tmp_path,
        run("10:00", "Zen", target(burst, 0.9, 0.85, True), target(submit, 0.2, 0.25, False)),
    )
    save(
        tmp_path,
        run("11:00", "Zen", target(burst, 0.8, 0.85, False), target(submit, 0.21, 0.25, False)),
    )
    # An older bench that did not measure bursts yet, on another CPU.
    save(tmp_path, run("09:00", "Xeon", target(submit, 0.3, 0.25, True)))
    # Not runs: the copy of the newest, and a GPU check without targets.
    save(tmp_path, run("11:00", "Zen"), "latest.json")
    save(tmp_path, {"device": "H200"}, "gpu-h200-keras-jax.json")

    runs = history.load_runs(tmp_path)
    assert [(r.started, r.cpu) for r in runs] == [
        ("2026-11-26 09:00", "Xeon"),
        ("2026-11-26 10:00", "Zen"),
        ("2026-11-26 11:00", "Zen"),
    ]

    columns = [c.header for c in history.COLUMNS]
    burst_col = columns.index("burst / served (>= 0.85)")
    submit_col = columns.index("submit / hello (>= 0.25)")
    rows = {
        line.strip("| ").split(" | ")[0]: [cell.strip() for cell in line.strip("| ").split(" | ")]
        for line in history.markdown(runs).splitlines()
        if line.startswith(("| Zen", "| Xeon", "| 2026"))
    }
    # Per CPU: "| cpu | runs | <one cell per column> |"
    zen, xeon = rows["Zen"], rows["Xeon"]
    assert zen[1] == "2"
    assert zen[2 + burst_col] == "1/2"
    assert zen[2 + submit_col] == "0/2"
    assert xeon[2 + burst_col] == "-"  # never measured there, not "0/0"
    assert xeon[2 + submit_col] == "1/1"
    # Every run: "| started | cpu | served | <cells> |"; misses in bold, unmeasured a dash.
    assert rows["2026-11-26 11:00"][3 + burst_col] == "**0.800**"
    assert rows["2026-11-26 11:00"][3 + submit_col] == "**0.210**"
    assert rows["2026-11-26 10:00"][3 + burst_col] == "0.900"
    assert rows["2026-11-26 09:00"][3 + burst_col] == "-"


def test_main_writes_the_file(tmp_path: Path) -> None:
    save(tmp_path, run("10:00", "Zen"))
    out = tmp_path / "HISTORY.md"
    history.main(["--results", str(tmp_path), "--write", str(out)])
    assert out.read_text().startswith("# Benchmark history\n")
    assert "| Zen | 1 |" in out.read_text()


def test_every_target_the_bench_reports_today_has_a_column() -> None:
    """A renamed target in bench/report.py must not turn its column into dashes."""
    newest = json.loads((RESULTS / "latest.json").read_text())
    names = [t["target"] for t in report.targets(newest) if not t.get("reference")]
    for name in names:
        assert any(name.startswith(c.prefix) for c in history.COLUMNS), name
    parsed = history.parse_run({**newest, "targets": report.targets(newest)})
    assert all(cell is not None for cell in parsed.cells)


def test_the_saved_runs_all_parse() -> None:
    runs = history.load_runs(RESULTS)
    assert runs, "bench/results holds the committed runs"
    assert all(r.cpu != "?" for r in runs)
