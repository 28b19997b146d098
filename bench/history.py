"""Every saved `make bench` run side by side: which of issue 4's targets each machine kind meets.

    python -m bench.history                      # print the Markdown
    python -m bench.history --write bench/results/HISTORY.md

Reads `bench/results/<timestamp>.json` (not `latest.json`, a copy of the newest) and shows each
run's targets as that run measured and reported them: the bench changed during the day, so
early runs lack some targets (a dash) and are not re-scored with today's rules. `make bench`
rewrites `bench/results/HISTORY.md` after each run.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}Z\.json$")


@dataclass(frozen=True)
class Column:
    """One target of issue 4: its short header and the target names that runs reported for it."""

    header: str
    prefix: str  # a run's target name starts with this (names carry thread and client counts)
    digits: int


COLUMNS = (
    Column("served / naive (>= 8)", "served runtime batched / naive model.predict b1", 1),
    Column("raw / limit (>= 0.6)", "raw batched / float32 physical limit", 3),
    Column(
        "burst / served (>= 0.85)",
        "end-to-end jobs/s (burst capacity) / raw batched as served",
        3,
    ),
    Column(
        "burst / all cores (>= 0.85)",
        "end-to-end jobs/s (burst capacity) / raw batched on all cores",
        3,
    ),
    Column(
        "batch burst / served (>= 0.85)",
        "same, batch submits: end-to-end / raw batched as served",
        3,
    ),
    Column(
        "batch burst / all cores (>= 0.85)",
        "same, batch submits: end-to-end / raw batched on all cores",
        3,
    ),
    Column("16 clients / naive (>= 5)", "system / naive Flask jobs/s", 2),
    Column("idle - b1 ms (<= 30)", "idle latency p50 - raw b1 latency", 1),
    # "API submit / plain hello" once the plain hello existed; "... / the faster hello" since
    # 2026-11-28 (the plain one left uploads unread and its clients resent them); earlier: one
    # reading the upload.
    Column("submit / hello (>= 0.25)", "API submit / ", 3),
    Column("API MB (<= 150)", "API peak RSS per process", 0),
    Column("worker MB (<= 1024)", "worker peak RSS", 0),
)


@dataclass(frozen=True)
class Run:
    """One saved run: when, on what CPU, and its targets by column (None: not measured)."""

    started: str
    cpu: str
    served: str
    cells: tuple[dict[str, Any] | None, ...]


def load_runs(folder: Path = RESULTS) -> list[Run]:
    """The runs saved in `folder`, oldest first; files without targets (GPU checks) are skipped."""
    runs = []
    for path in sorted(folder.iterdir()):
        if not STAMP.match(path.name):
            continue
        data = json.loads(path.read_text())
        if "targets" in data:
            runs.append(parse_run(data))
    return runs


def parse_run(data: dict[str, Any]) -> Run:
    targets = data["targets"]
    return Run(
        started=str(data.get("started", "?"))[:16].replace("T", " "),
        cpu=str(data.get("machine", {}).get("cpu", "?")),
        served=str(data.get("served_runtime", "?")),
        cells=tuple(_find(targets, column) for column in COLUMNS),
    )


def _find(targets: Iterable[dict[str, Any]], column: Column) -> dict[str, Any] | None:
    return next((t for t in targets if str(t["target"]).startswith(column.prefix)), None)


def markdown(runs: Sequence[Run]) -> str:
    """A summary per CPU kind (targets met / runs that measured them), then every run."""
    lines = [
        "# Benchmark history",
        "",
        "Written by `python -m bench.history` from `bench/results/*.json` (`make bench` refreshes"
        " it). Each run as it reported itself; a dash: that run's bench did not measure it."
        " Definitions moved twice on 2026-11-27 evening (runs from 18:00 UTC on): the system's"
        " clients fetch the mask before a job counts (idle latency, 16 clients), and submit /"
        " hello divides by a plain hello, not one that parses the upload.",
        "",
        "## Targets met, by CPU kind",
        "",
        "| CPU | runs | " + " | ".join(c.header for c in COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(COLUMNS),
    ]
    for cpu, group in _by_cpu(runs).items():
        cells = []
        for i in range(len(COLUMNS)):
            measured = [r.cells[i] for r in group if r.cells[i] is not None]
            met = sum(1 for cell in measured if cell and cell["met"])
            cells.append(f"{met}/{len(measured)}" if measured else "-")
        lines.append(f"| {cpu} | {len(group)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every run",
        "",
        "Misses in bold.",
        "",
        "| started (UTC) | CPU | served | " + " | ".join(c.header for c in COLUMNS) + " |",
        "|---|---|---|" + "---:|" * len(COLUMNS),
    ]
    for run in runs:
        cells = [_cell(cell, c.digits) for cell, c in zip(run.cells, COLUMNS, strict=True)]
        lines.append(f"| {run.started} | {run.cpu} | {run.served} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _by_cpu(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.cpu, []).append(run)
    return groups


def _cell(cell: dict[str, Any] | None, digits: int) -> str:
    if cell is None:
        return "-"
    text = f"{float(cell['measured']):.{digits}f}"
    return text if cell["met"] else f"**{text}**"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of run JSON files")
    parser.add_argument("--write", type=Path, help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    text = markdown(load_runs(args.results))
    if args.write:
        args.write.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
