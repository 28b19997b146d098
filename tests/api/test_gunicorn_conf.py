"""api/gunicorn_conf.py: the API steps back on the CPU so the model gets it first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import os
from api.gunicorn_conf import yield_cpu
yield_cpu({nice})
group = "-"  # no autogroups, or the root one (init's session), which reads as empty
if os.path.exists("/proc/self/autogroup"):
    group = (open("/proc/self/autogroup").read().split() or ["-"])[-1]
read, write = os.pipe()
if os.fork() == 0:  # as gunicorn forks its workers
    os.write(write, str(os.nice(0)).encode())
    os._exit(0)
os.wait()
print(os.nice(0), group, os.read(read, 16).decode())
"""


def probe(nice: int, *, own_session: bool) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(nice=nice)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        start_new_session=own_session,
        timeout=60,
    ).stdout
    return out.split()


def test_api_runs_at_the_configured_niceness_and_so_do_its_forks() -> None:
    nice, group, after_fork = probe(7, own_session=False)
    assert nice == "7"
    assert after_fork == "7"
    assert group != "7"  # a process in someone else's session leaves that group alone


def test_api_leading_its_own_session_lowers_its_autogroup() -> None:
    if not Path("/proc/self/autogroup").exists():
        pytest.skip("this kernel has no autogroups")
    nice, group, _ = probe(7, own_session=True)
    assert (nice, group) == ("7", "7")


def test_zero_leaves_the_priority_alone() -> None:
    nice, _, _ = probe(0, own_session=True)
    assert nice == "0"
