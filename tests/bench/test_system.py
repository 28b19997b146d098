"""bench/system.py: the CPU meters a benchmark reads from /proc."""

from __future__ import annotations

import subprocess
import sys
import time

from bench import system


def spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_machine_cpu_seconds_counts_this_process_spinning() -> None:
    busy, steal = system.machine_cpu_seconds()
    spin(0.3)
    busy_after, steal_after = system.machine_cpu_seconds()
    assert busy_after - busy >= 0.2  # at least this process's spin (ticks are 10 ms)
    assert steal_after >= steal >= 0


def test_cpu_meter_puts_the_load_generator_in_the_total_and_the_rest_beside_it() -> None:
    meter = system.CpuMeter({})
    meter.start()
    spin(0.3)
    per_job = meter.per_job(10)
    assert per_job["load generator"] >= 25.0  # 0.3 s over 10 jobs, less timer granularity
    assert per_job["total"] == sum(
        v for k, v in per_job.items() if k not in ("total", "other", "steal")
    )
    assert per_job["steal"] >= 0.0


def test_cpu_meter_counts_a_process_outside_its_groups_as_other() -> None:
    meter = system.CpuMeter({})
    meter.start()
    busy = subprocess.run(  # not in any group: the rest of the machine
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass",
        ],
        check=True,
    )
    assert busy.returncode == 0
    per_job = meter.per_job(10)
    assert per_job["other"] >= 25.0  # 0.4 s over 10 jobs, less timer granularity
