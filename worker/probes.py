"""Probe files for Kubernetes exec probes, as cog does: `ready` once the model is loaded,
`alive` touched on every Celery heartbeat (every 2 s while the event loop turns).

Readiness: `test -f $SEG_PROBE_DIR/ready`. Liveness: `alive` changed within the last minute.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

READY = "ready"
ALIVE = "alive"


def write_probe(probe_dir: Path | None, name: str) -> None:
    """Create or refresh a probe file (atomic: a probe never sees a half-written file)."""
    if probe_dir is None:
        return
    probe_dir.mkdir(parents=True, exist_ok=True)
    tmp = probe_dir / f".{name}.{os.getpid()}"
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
