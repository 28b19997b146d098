"""Writing files that readers in other threads or processes only ever see whole; lock files."""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, sync_folder: bool = False) -> None:
    """Write `data` to `path`, whole or not at all (see `replace_atomically`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(data)

    replace_atomically(path, write, sync_folder=sync_folder)


def replace_atomically(
    path: Path, write: Callable[[Path], object], *, suffix: str = "", sync_folder: bool = False
) -> None:
    """`write(tmp)` writes the new content into a temporary file of its own beside `path` (a
    name per write, so threads or processes writing one path at once never share, truncate or
    rename each other's file; it ends with `suffix`, for writers that choose a format by the
    name), which is fsynced, then renamed over `path`. A reader sees the old file or the whole
    new one, and a crash leaves nothing half-written under `path`.

    `sync_folder` also fsyncs the folder, so that after a power loss the new name cannot have
    landed before the data (a cache that trusts what it finds needs that)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_folder:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """fsync a folder: the names made or renamed in it survive a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders_durably(folder: Path) -> None:
    """`folder` and its missing parents, each one's name fsynced into its parent: a file
    written durably into a folder that a crash then takes away is lost all the same."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
        fsync_folder(made.parent)


@contextmanager
def try_lock(path: Path, *, create: bool = True) -> Iterator[bool]:
    """Hold the lock file `path` while True; False, at once, if another process (or another
    open of it in this one) holds it. A missing file is made, or with `create=False` (where
    making it would change what its folder says, e.g. its mtime) means no one holds it: True,
    with nothing held."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    except FileNotFoundError:
        if create:
            raise
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
