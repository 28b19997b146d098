"""Writing files that readers in other threads or processes only ever see whole."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, sync_folder: bool = False) -> None:
    """Write `data` to `path`: into a temporary file of its own beside it (a name per write, so
    threads or processes writing one path at once never share, truncate or rename each other's
    file), fsynced, then renamed over `path`. A reader sees the old file or the whole new one.

    `sync_folder` also fsyncs the folder, so that after a power loss the new name cannot have
    landed before the data (a cache that trusts what it finds needs that)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_folder:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
