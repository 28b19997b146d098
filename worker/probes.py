"""Probe files for Kubernetes exec probes, as cog does: `ready` once the model is loaded,
`alive` touched on every Celery heartbeat (every 2 s while the event loop turns).

Exec probes: `python -m worker.probes ready` (readiness), `python -m worker.probes alive`
(liveness: `alive` changed within SEG_PROBE_MAX_AGE seconds), `python -m worker.probes started`
(startup: `ready`, or the broker does not answer); no argument checks both files.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

READY = "ready"
ALIVE = "alive"
# Not a file: `ready`, excused while the broker does not answer (for startup probes).
STARTED = "started"


def write_probe(probe_dir: Path | None, name: str) -> None:
    """Create or refresh a probe file (atomic: a probe never sees a half-written file; one
    temporary file per thread, as a model-load thread and the heartbeat may both write)."""
    if probe_dir is None:
        return
    probe_dir.mkdir(parents=True, exist_ok=True)
    tmp = probe_dir / f".{name}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(f"{time.time():.0f}\n")
    tmp.replace(probe_dir / name)


def clear_probes(probe_dir: Path | None) -> None:
    """Remove both files: a restarted container must not inherit a stale `ready`."""
    if probe_dir is None:
        return
    for name in (READY, ALIVE):
        (probe_dir / name).unlink(missing_ok=True)


def probe_age(probe_dir: Path, name: str) -> float | None:
    """Seconds since the probe file last changed; None when it is absent."""
    try:
        return time.time() - (probe_dir / name).stat().st_mtime
    except FileNotFoundError:
        return None


def check(probe_dir: Path, *, need: tuple[str, ...], max_age: float) -> str | None:
    """None when every needed probe file exists and is fresh enough, else the reason."""
    for name in (READY if n == STARTED else n for n in need):
        age = probe_age(probe_dir, name)
        if age is None:
            return f"{name} missing"
        if name == ALIVE and age > max_age:
            return f"{name} is {age:.0f}s old"
    return None


def broker_unreachable(url: str) -> bool:
    """Whether the Redis broker at `url` does not answer a PING within a second (False for
    other brokers, which this cannot ask)."""
    if not url.startswith(("redis://", "rediss://")):  # segsvc.settings.is_redis_url, without
        return False  # importing the settings module (pydantic) into every probe run
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except Exception:
        return True
    finally:
        client.close()
    return False


def broker_explains(problem: str, need: tuple[str, ...]) -> bool:
    """Whether a broker outage accounts for `problem`: Celery sends no heartbeats while it
    reconnects, and writes neither file before it first connects (`alive` is then missing, not
    stale; `ready` too, which only the `started` check excuses: readiness still waits)."""
    if problem.startswith(f"{ALIVE} "):  # missing or stale
        return True
    return STARTED in need and problem == f"{READY} missing"


def main(argv: list[str]) -> int:
    """`python -m worker.probes [ready|alive|started]`: exit 0 when healthy (both files by
    default).

    A stale or missing `alive` is excused while the broker does not answer, and so is a missing
    `ready` for `started`: restarting a worker that only waits for Redis helps nothing (it
    would not even get ready again until Redis is back, and be killed again for that), and a
    pod that starts during an outage has written neither file yet."""
    probe_dir = Path(os.environ.get("SEG_PROBE_DIR", "/tmp/segsvc-probes"))  # noqa: S108
    need = tuple(argv) or (READY, ALIVE)
    problem = check(probe_dir, need=need, max_age=float(os.environ.get("SEG_PROBE_MAX_AGE", 60)))
    excusable = problem is not None and broker_explains(problem, need)
    if excusable and broker_unreachable(os.environ.get("SEG_BROKER_URL", "")):
        sys.stderr.write(f"{problem}, but the broker does not answer: waiting for it\n")
        return 0
    if problem:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
