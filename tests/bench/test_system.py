"""bench/system.py: the CPU meters a benchmark reads from /proc."""

from __future__ import annotations

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
    assert per_job["other"] >= 0.0
    assert per_job["steal"] >= 0.0
