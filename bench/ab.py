"""`make bench-ab BASE=<rev>`: an interleaved A/B of two checkouts of the running system.

This machine's speed drifts by 10-20% within minutes, so two `make bench` runs minutes apart
cannot show a change of a few percent. Here both systems (base: a git revision, checked out
as a worktree under `var/ab/`; head: this working tree, uncommitted changes included, or
`--head REV`) are up at once, each with its own gunicorn API, Celery worker, Postgres
database and Redis DB, sharing this venv and the served model, and are driven in turn: rounds
alternate base, head / head, base, so drift hits both sides alike. Each round runs an idle
client, 16 long-polling clients, a burst of single submits and a burst of batch submits
(`--runs` picks), each on both sides back to back before the next. The report gives each
side's median round, the range of its rounds, head / base and the paired ratio of each round;
a change whose paired ratios fall on both sides of 1 is within the noise.

Writes `var/ab/<stamp>.md` and `.json` (or `--out`) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench import load, report, system
from segsvc.client import LONG_POLL_S
from segsvc.settings import ROOT

RUNS = ("idle", "clients", "burst", "batch")
AB_DIR = ROOT / "var" / "ab"
# Per side: the database and the Redis logical DB (make bench uses 15; tests keep to 1-12).
SIDES = {"base": ("segsvc_ab_base", 14), "head": ("segsvc_ab_head", 13)}
# What the report compares, per run: (label, path into a round's summary, digits).
METRICS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("jobs/s", ("jobs_per_s",), 1),
    ("p50 ms", ("p50_ms",), 1),
    ("p95 ms", ("p95_ms",), 1),
    ("mean batch", ("mean_batch_size",), 1),
    ("core-ms/job, total", ("cpu_ms_per_job", "total"), 2),
    ("core-ms/job, api", ("cpu_ms_per_job", "api"), 2),
    ("core-ms/job, worker", ("cpu_ms_per_job", "worker"), 2),
    ("core-ms/job, postgres", ("cpu_ms_per_job", "postgres"), 2),
    # The rest of the machine and the hypervisor's steal (bench.system.CpuMeter): disturbance.
    ("core-ms/job, other", ("cpu_ms_per_job", "other"), 2),
    ("ms/job stolen", ("cpu_ms_per_job", "steal"), 2),
)

T0 = time.monotonic()

# Run in a side's checkout (cwd and PYTHONPATH), with that side's code: its migrations, its
# registry and keys, whatever their schema at that revision.
SETUP = """
import json, sys
from pathlib import Path
from segsvc.db import session_scope
from segsvc.migrate import upgrade
from segsvc.models import ModelStatus
from segsvc.services.keys import create_key
from segsvc.services.registry import register_version
from segsvc.settings import Settings

cfg = Settings(_env_file=None)
upgrade(settings=cfg)
with session_scope(cfg) as session:
    register_version(
        session=session, version="bench", path=Path(sys.argv[1]),
        status=ModelStatus.PRODUCTION, metrics={"faithful_runtimes": json.loads(sys.argv[2])},
    )
    _, key = create_key(session=session, name="bench")
print("SEG-AB-KEY " + key)
"""


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--head", default=None, help="git revision (default: this working tree)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per side (default 4)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {RUNS}")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "baseline.keras")
    p.add_argument(
        "--data", type=Path, default=load.DEFAULT_DATA, help="Oxford-layout sample folder"
    )
    p.add_argument("--runtime", default="litert-int8", help="SEG_RUNTIME on both sides")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=6.0, help="idle and 16-client runs")
    p.add_argument("--burst-jobs", type=int, default=600)
    p.add_argument("--out", type=Path, default=None, help="report path (default var/ab/)")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown or not args.runs:
        p.error(f"--runs takes some of {', '.join(RUNS)}; got {', '.join(unknown) or 'none'}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def checkout(rev: str, repo: Path = ROOT, under: Path = AB_DIR / "checkouts") -> Path:
    """A detached worktree of `rev` under `under`, made once per commit and reused."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}", cwd=repo)
    folder = under / sha[:12]
    if not (folder / ".git").exists():
        under.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", "--force", str(folder), sha, cwd=repo)
    elif git("rev-parse", "HEAD", cwd=folder) != sha:
        raise RuntimeError(f"{folder} is not at {sha}; remove it (git worktree remove)")
    return folder


def round_order(index: int) -> tuple[str, str]:
    """Who goes first in round `index`: base, head / head, base / base, head ..."""
    return ("base", "head") if index % 2 == 0 else ("head", "base")


@dataclass
class Side:
    """One checkout's running system."""

    name: str
    root: Path
    label: str  # the revision, for the report
    port: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    services: dict[str, system.Service] = field(default_factory=dict)

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            service.stop()


def start_side(side: Side, args: argparse.Namespace, var: Path) -> None:
    """A fresh database and Redis DB, the side's own migrations, key and model version, then
    its API and worker, all run from the side's checkout."""
    db_name, redis_db = SIDES[side.name]
    redis_url = with_redis_db(system.REDIS_URL, redis_db)
    url = system.fresh_database(db_name, redis_url)
    side_var = var / side.name
    side_var.mkdir(parents=True, exist_ok=True)
    env = system.bench_env(
        url,
        side_var,
        redis_url=redis_url,
        SEG_RUNTIME=args.runtime,
        # One converted artifact for both sides (and make bench): conversion is keyed by the
        # model's sha256 and the converters' fingerprint, so a side whose recipe differs
        # converts its own.
        SEG_ARTIFACT_CACHE_DIR=str(ROOT / "var" / "bench" / "artifacts"),
        PYTHONPATH=str(side.root),
    )
    faithful = json.dumps([args.runtime])
    done = subprocess.run(
        [sys.executable, "-c", SETUP, str(args.model.resolve()), faithful],
        cwd=side.root,
        env=env,
        capture_output=True,
        text=True,
    )
    keys = [ln for ln in done.stdout.splitlines() if ln.startswith("SEG-AB-KEY ")]
    if done.returncode != 0 or not keys:
        raise RuntimeError(
            f"{side.name}: setup failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    side.headers = {"Authorization": f"Bearer {keys[-1].split(' ', 1)[1]}"}
    logs = side_var / "logs"
    logs.mkdir(exist_ok=True)
    side.port = system.free_port()
    side.services["api"] = system.gunicorn(
        f"api-{side.name}", "api.wsgi:app", side.port, env, logs, system.GUNICORN, side.root
    )
    side.services["worker"] = system.worker(
        env, logs, side_var / "probes", side.root, name=f"worker-{side.name}"
    )


def with_redis_db(url: str, db: int) -> str:
    """`url` with its logical database (the path) replaced by `db`, query string kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def runs_for(
    side: Side, args: argparse.Namespace, bodies: list[load.Multipart], batches: list[Any]
) -> dict[str, Callable[[], load.LoadResult]]:
    port, headers = side.port, side.headers
    return {
        "idle": lambda: load.run_jobs_load(
            port, headers, bodies, clients=1, seconds=args.seconds, poll_s=0.005, wait_s=LONG_POLL_S
        ),
        "clients": lambda: load.run_jobs_load(
            port,
            headers,
            bodies,
            clients=args.clients,
            seconds=args.seconds,
            poll_s=0.1,
            wait_s=LONG_POLL_S,
        ),
        "burst": lambda: load.run_burst(
            port, headers, bodies, jobs=args.burst_jobs, clients=args.clients
        ),
        "batch": lambda: load.run_burst(
            port,
            headers,
            batches,
            jobs=args.burst_jobs,
            clients=args.clients,
            per_request=load.BATCH_SUBMIT_IMAGES,
        ),
    }


def pick(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)


def compare(
    rounds: dict[str, dict[str, list[dict[str, Any]]]], runs: Sequence[str]
) -> list[dict[str, Any]]:
    """Per run and metric: each side's median and range over its rounds, head / base of the
    medians, and the paired ratios (head / base within each round, the two run back to back,
    so the host's drift mostly cancels). `overlap`: the two sides' ranges overlap; `mixed`: the
    paired ratios fall on both sides of 1 (either way, the difference is within the noise)."""
    rows = []
    for run in runs:
        for label, path, digits in METRICS:
            cell: dict[str, Any] = {"run": run, "metric": label, "digits": digits}
            per_side: dict[str, list[float | None]] = {}
            for name in ("base", "head"):
                per_side[name] = [pick(r, path) for r in rounds[name][run]]
                values = [v for v in per_side[name] if v is not None]
                cell[name] = {
                    "median": statistics.median(values) if values else None,
                    "min": min(values, default=None),
                    "max": max(values, default=None),
                    "rounds": values,
                }
            base, head = cell["base"], cell["head"]
            if base["median"] is None or head["median"] is None:
                continue
            cell["ratio"] = head["median"] / base["median"] if base["median"] else None
            cell["overlap"] = head["min"] <= base["max"] and base["min"] <= head["max"]
            paired = [
                h / b
                for b, h in zip(per_side["base"], per_side["head"], strict=False)
                if b and h is not None
            ]
            cell["paired"] = {
                "median": statistics.median(paired) if paired else None,
                "min": min(paired, default=None),
                "max": max(paired, default=None),
                "rounds": paired,
            }
            cell["mixed"] = not paired or (min(paired) <= 1.0 <= max(paired))
            rows.append(cell)
    return rows


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        "# A/B: head against base",
        "",
        f"- Date: {result['started']} (took {result['seconds']:.0f} s)",
        f"- Machine: {machine.get('cores')} cores, {machine.get('cpu')}",
        f"- Load average before / after: {_loads(result['load_before'])} / "
        f"{_loads(result['load_after'])}",
        f"- base: `{result['base']}`; head: `{result['head']}`",
        f"- {result['rounds']} rounds per side, alternating (base first in even rounds); "
        f"runtime `{result['runtime']}`; burst {result['burst_jobs']} jobs; "
        f"idle and {result['clients']}-client runs {result['run_seconds']:g} s",
        f"- Worker peak RSS (MB): base {result['worker_rss_mb']['base']:.0f}, "
        f"head {result['worker_rss_mb']['head']:.0f}",
        "",
        "Median round per side, [lowest - highest round]; head / base of those medians; "
        "paired: head / base within each round (the two sides ran back to back), median "
        "[range]. `~` marks a difference within the noise: the sides' rounds overlap "
        "(medians) or the paired ratios fall on both sides of 1 (paired).",
        "",
        "| run | metric | base | head | head / base | paired |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["comparison"]:
        d = row["digits"]
        ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.3f}"
        paired = row["paired"]
        pair = (
            "-"
            if paired["median"] is None
            else f"{paired['median']:.3f} [{paired['min']:.3f} - {paired['max']:.3f}]"
        )
        lines.append(
            f"| {row['run']} | {row['metric']} | {_cell(row['base'], d)} | "
            f"{_cell(row['head'], d)} | {ratio}{' ~' if row['overlap'] else ''} | "
            f"{pair}{' ~' if row['mixed'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def _cell(side: dict[str, Any], digits: int) -> str:
    return f"{side['median']:.{digits}f} [{side['min']:.{digits}f} - {side['max']:.{digits}f}]"


def _loads(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = datetime.now(UTC)
    photos = load.sample_photos(args.data)
    if not photos or not args.model.is_file():
        raise SystemExit(f"need photos under {args.data}/images and the model {args.model}")
    bodies = [load.multipart(p) for p in photos]
    batches = load.batch_multiparts(photos)
    sides = {
        "base": Side("base", checkout(args.base), git("rev-parse", "--short=12", args.base)),
        "head": (
            Side("head", checkout(args.head), git("rev-parse", "--short=12", args.head))
            if args.head
            else Side("head", ROOT, _working_tree_label())
        ),
    }
    if (sides["base"].root / "pyproject.toml").read_bytes() != (
        sides["head"].root / "pyproject.toml"
    ).read_bytes():
        log("warning: the sides' pyproject.toml differ; both run on this venv's packages")
    var = AB_DIR / "run"
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {run: [] for run in args.runs} for name in sides
    }
    load_before = os.getloadavg()
    try:
        for side in sides.values():
            log(f"{side.name} ({side.label}): starting from {side.root}")
            start_side(side, args, var)
        for side in sides.values():
            log(f"{side.name}: warm-up")
            load.run_jobs_load(side.port, side.headers, bodies, clients=4, seconds=3, poll_s=0.01)
        drives = {name: runs_for(side, args, bodies, batches) for name, side in sides.items()}
        for index in range(args.rounds):
            # Run by run, the two sides back to back, so each pair shares the host's moment.
            for run in args.runs:
                for name in round_order(index):
                    side = sides[name]
                    summary = system.metered(side.services, drives[name][run])
                    rounds[name][run].append(summary)
                    log(
                        f"round {index + 1} {name} {run}: {summary['jobs_per_s']:.1f} jobs/s, "
                        f"p50 {summary['p50_ms']:.0f} ms, "
                        f"{summary['cpu_ms_per_job']['total']:.1f} core-ms/job, "
                        f"{summary['errors']} errors"
                    )
        rss = {
            n: max(s.services["worker"].peak_rss_mb().values(), default=0.0)
            for n, s in sides.items()
        }
    finally:
        for side in sides.values():
            side.stop()
    result = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": time.monotonic() - T0,
        "machine": report.machine(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "base": sides["base"].label,
        "head": sides["head"].label,
        "rounds": args.rounds,
        "runtime": args.runtime,
        "burst_jobs": args.burst_jobs,
        "clients": args.clients,
        "run_seconds": args.seconds,
        "worker_rss_mb": rss,
        "comparison": compare(rounds, args.runs),
        "raw_rounds": rounds,
    }
    text = markdown(result)
    out = args.out or AB_DIR / f"{started:%Y-%m-%dT%H%M%SZ}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(text)
    log(f"wrote {out} and {out.with_suffix('.json').name}")


def _working_tree_label() -> str:
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return git("rev-parse", "--short=12", "HEAD") + (" + uncommitted changes" if dirty else "")


if __name__ == "__main__":
    main()
