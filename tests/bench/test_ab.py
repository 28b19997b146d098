"""bench/ab.py: the interleaved A/B of two checkouts (its bookkeeping; the systems it drives are
the same ones `make bench` starts)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import ab


def summary(jobs_per_s: float, total_ms: float, batch: float | None = 8.0) -> dict[str, Any]:
    return {
        "jobs_per_s": jobs_per_s,
        "p50_ms": 1000.0 / jobs_per_s,
        "p95_ms": 2000.0 / jobs_per_s,
        "mean_batch_size": batch,
        "cpu_ms_per_job": {"total": total_ms, "api": total_ms / 2, "worker": total_ms / 3},
        "errors": 0,
    }


def test_rounds_alternate_which_side_goes_first() -> None:
    assert [ab.round_order(i) for i in range(4)] == [
        ("base", "head"),
        ("head", "base"),
        ("base", "head"),
        ("head", "base"),
    ]


def test_compare_gives_medians_ranges_ratio_and_whether_rounds_overlap() -> None:
    rounds = {
        "base": {"burst": [summary(70, 25), summary(74, 24), summary(72, 26)]},
        "head": {"burst": [summary(80, 20), summary(84, 21), summary(82, 19)]},
    }
    rows = {row["metric"]: row for row in ab.compare(rounds, ["burst"])}

    jobs = rows["jobs/s"]
    assert jobs["base"]["median"] == 72
    assert jobs["head"]["median"] == 82
    assert (jobs["base"]["min"], jobs["base"]["max"]) == (70, 74)
    assert jobs["ratio"] == pytest.approx(82 / 72)
    assert jobs["overlap"] is False  # 80-84 against 70-74: a real difference
    # round by round (the sides ran back to back): 80/70, 84/74, 82/72
    assert jobs["paired"]["rounds"] == pytest.approx([80 / 70, 84 / 74, 82 / 72])
    assert jobs["paired"]["median"] == pytest.approx(82 / 72)
    assert jobs["mixed"] is False

    total = rows["core-ms/job, total"]
    assert total["ratio"] == pytest.approx(20 / 25)
    # a metric neither side measured (no postgres figure here) is left out, not shown as 0
    assert "core-ms/job, postgres" not in rows


def test_compare_marks_overlapping_rounds_as_noise() -> None:
    rounds = {
        "base": {"idle": [summary(20, 50), summary(24, 48)]},
        "head": {"idle": [summary(23, 49), summary(26, 47)]},
    }
    jobs = next(r for r in ab.compare(rounds, ["idle"]) if r["metric"] == "jobs/s")
    assert jobs["overlap"] is True
    assert jobs["mixed"] is False  # yet head won both rounds: 23/20 and 26/24


def test_paired_ratios_cancel_drift_that_medians_cannot() -> None:
    # The host slows down between rounds; within each round head is ~3% slower.
    rounds = {
        "base": {"burst": [summary(100, 20), summary(90, 20), summary(80, 20), summary(70, 20)]},
        "head": {"burst": [summary(97, 20), summary(87, 20), summary(78, 20), summary(68, 20)]},
    }
    jobs = next(r for r in ab.compare(rounds, ["burst"]) if r["metric"] == "jobs/s")
    assert jobs["overlap"] is True  # the medians alone cannot tell
    assert jobs["mixed"] is False
    assert 0.96 < jobs["paired"]["median"] < 0.98
    assert jobs["paired"]["max"] < 1.0

    rounds["head"]["burst"][1] = summary(92, 20)  # one round the other way: noise
    jobs = next(r for r in ab.compare(rounds, ["burst"]) if r["metric"] == "jobs/s")
    assert jobs["mixed"] is True


def test_markdown_shows_each_side_and_flags_noise() -> None:
    rounds = {
        "base": {"idle": [summary(20, 50, None), summary(24, 48, None)]},
        "head": {"idle": [summary(30, 40, None), summary(32, 41, None)]},
    }
    result = {
        "started": "2026-11-27T04:00:00+00:00",
        "seconds": 200.0,
        "machine": {"cores": 2, "cpu": "AMD EPYC (family 26, model 2)"},
        "load_before": [0.1, 0.2, 0.3],
        "load_after": [1.0, 1.1, 1.2],
        "base": "abc123",
        "head": "def456 + uncommitted changes",
        "rounds": 2,
        "runtime": "litert-int8",
        "burst_jobs": 600,
        "clients": 16,
        "run_seconds": 6.0,
        "worker_rss_mb": {"base": 400.0, "head": 380.0},
        "comparison": ab.compare(rounds, ["idle"]),
    }
    text = ab.markdown(result)
    assert (
        "| idle | jobs/s | 22.0 [20.0 - 24.0] | 31.0 [30.0 - 32.0] | 1.409 "
        "| 1.417 [1.333 - 1.500] |" in text
    )
    assert "| idle | core-ms/job, total | 49.00 [48.00 - 50.00] |" in text
    assert "mean batch" not in text  # no batch sizes measured: no row
    assert "base `abc123`" in text.replace(": `", " `")


def test_parse_args_refuses_unknown_runs_and_zero_rounds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert ab.parse_args(["--base", "HEAD~1", "--runs", "burst, batch"]).runs == ["burst", "batch"]
    with pytest.raises(SystemExit):
        ab.parse_args(["--base", "HEAD~1", "--runs", "burst,warp"])
    assert "warp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab.parse_args(["--base", "HEAD~1", "--rounds", "0"])


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_checkout_makes_a_worktree_of_the_revision_once_and_reuses_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("old = True\n")
    git(repo, "add", "code.py")
    git(repo, "commit", "-qm", "old")
    old = git(repo, "rev-parse", "HEAD")
    (repo / "code.py").write_text("old = False\n")
    git(repo, "commit", "-qam", "new")

    folder = ab.checkout("HEAD~1", repo=repo, under=tmp_path / "checkouts")
    assert folder.name == old[:12]
    assert (folder / "code.py").read_text() == "old = True\n"
    assert (repo / "code.py").read_text() == "old = False\n"  # the working tree is untouched
    assert ab.checkout(old, repo=repo, under=tmp_path / "checkouts") == folder

    with pytest.raises(subprocess.CalledProcessError):
        ab.checkout("no-such-rev", repo=repo, under=tmp_path / "checkouts")


def test_with_redis_db_replaces_only_the_database() -> None:
    assert ab.with_redis_db("redis://127.0.0.1:6379/15", 14) == "redis://127.0.0.1:6379/14"
    assert ab.with_redis_db("redis://127.0.0.1:6379", 13) == "redis://127.0.0.1:6379/13"
    assert (
        ab.with_redis_db("redis://:pw@127.0.0.1:6379/0?socket_timeout=5", 14)
        == "redis://:pw@127.0.0.1:6379/14?socket_timeout=5"
    )
