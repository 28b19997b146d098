"""Pruning the converted-artifact cache of `segsvc.ml.convert` so that it does not grow for ever.

Every retraining adds a model version and every converter upgrade a fingerprint, each a folder
`<artifact_dir>/<sha256>/<kind>-<fingerprint>/` of tens of MB. `prune_artifacts` deletes, once
unused for a grace period: the folders of models whose sha256 the caller does not keep (the
registry's servable versions: `segsvc.services.artifacts`), the folders of other fingerprints
(or kinds this code does not know) of the kept ones, and files set aside as broken or left
half-written by a crash in the folders it keeps.

Workers share the cache (a volume of every pod), so a deletion is safe against them:

- a folder whose `.lock` a worker holds (it is converting into it) is skipped, never waited for;
- "unused" is the folder's mtime, aged on the filesystem's clock (on NFS, the file server's):
  `ensure_artifacts` marks it at every load, and serving workers mark theirs every few minutes
  (a LiteRT file is mapped while it serves: deleting it from another host of a shared NFS
  volume could crash the worker that maps it);
- the folder is renamed aside in one step, under its lock, and only then deleted: a worker finds
  the whole folder or none (and converts again), never a half-deleted one that passes its
  file check. Its mtime is read again after the rename: a load that marked it meanwhile puts it
  back;
- one pruner runs at a time (`.prune.lock` in the cache); another skips its pass.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Collection
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from segsvc.files import try_lock
from segsvc.ml.convert import CONVERTED_KINDS, converter_fingerprint

log = logging.getLogger(__name__)

SHA256 = re.compile(r"[0-9a-f]{64}")
BROKEN = re.compile(r"\..+\.broken-(?P<ns>\d+)")  # `set_aside`'s `.<name>.broken-<time_ns>`
TEMPORARY = re.compile(r"\..+\.tmp")  # a `write_atomically` file whose writer was killed
ASIDE = ".prune-"  # in `.<folder>.prune-<token>`: renamed aside, being deleted


@dataclass
class PruneResult:
    """What one pass did (in a dry run: would do)."""

    removed: list[Path] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)  # skipped: a worker is converting into it
    freed_bytes: int = 0
    skipped: bool = False  # another pruner was running: nothing looked at


def prune_artifacts(
    artifact_dir: Path, *, keep: Collection[str], older_than_s: float, dry_run: bool = False
) -> PruneResult:
    """Delete what no model in `keep` (sha256s) serves from, once unused for `older_than_s`.

    `keep` must be read before this runs: a version that starts serving meanwhile has a folder
    converted or loaded just now, which the grace period keeps."""
    result = PruneResult()
    if not artifact_dir.is_dir():
        return result
    with try_lock(artifact_dir / ".prune.lock") as alone:
        if not alone:
            result.skipped = True
            return result
        current = {f"{kind}-{converter_fingerprint(kind)}" for kind in CONVERTED_KINDS}
        cutoff = _filesystem_now(artifact_dir) - older_than_s
        for model_dir in sorted(artifact_dir.iterdir()):
            if SHA256.fullmatch(model_dir.name) and model_dir.is_dir():
                kept = current if model_dir.name in keep else set()
                _prune_model(model_dir, kept, cutoff, dry_run, result)
    return result


def _prune_model(
    model_dir: Path, current: set[str], cutoff: float, dry_run: bool, result: PruneResult
) -> None:
    """Prune one model's folders; `current` names those to keep (none: the model is not kept)."""
    for folder in sorted(model_dir.iterdir()):
        try:
            if ASIDE in folder.name:
                if not dry_run:  # a pruner died before deleting it (pruners take turns)
                    shutil.rmtree(folder, ignore_errors=True)
            elif folder.name.startswith(".") or not folder.is_dir():
                continue
            elif folder.name in current:
                _prune_files(folder, cutoff, dry_run, result)
            else:
                _prune_folder(folder, cutoff, dry_run, result)
        except OSError:  # one folder's trouble (a permission, a stale handle) stops no other
            log.warning("could not prune %s", folder, exc_info=True)
    if not current and not dry_run:
        with suppress(OSError):
            model_dir.rmdir()  # only when empty; `_locked` makes it again if a load needs it


def _prune_folder(folder: Path, cutoff: float, dry_run: bool, result: PruneResult) -> None:
    """Delete `folder` unless a worker holds its lock or it was used since `cutoff`."""
    # Not made if missing: that would mark the folder used (its mtime); a folder without one
    # was never converted into by a worker, so there is nothing to hold.
    with try_lock(folder / ".lock", create=False) as free:
        if not free:
            result.busy.append(folder)
            return
        if folder.stat().st_mtime >= cutoff:
            return
        size = _size(folder)
        if dry_run:
            result.removed.append(folder)
            result.freed_bytes += size
            return
        aside = folder.with_name(f".{folder.name}{ASIDE}{secrets.token_hex(4)}")
        os.rename(folder, aside)
        # A load marked it between the check and the rename: put it back (unless a worker has
        # meanwhile made the folder anew and converts into it: then this copy goes).
        if aside.stat().st_mtime >= cutoff:
            with suppress(OSError):
                os.rename(aside, folder)
                return
    shutil.rmtree(aside, ignore_errors=True)
    result.removed.append(folder)
    result.freed_bytes += size


def _prune_files(folder: Path, cutoff: float, dry_run: bool, result: PruneResult) -> None:
    """Delete old set-aside broken files and temporary files of killed writes in `folder`."""
    # A conversion's temporary files are its own.
    with try_lock(folder / ".lock", create=False) as free:
        if not free:
            result.busy.append(folder)
            return
        for path in sorted(folder.iterdir()):
            broken = BROKEN.fullmatch(path.name)
            if broken is not None:
                stale = int(broken["ns"]) / 1e9 < cutoff  # when it was set aside
            elif TEMPORARY.fullmatch(path.name) is not None:
                stale = path.stat().st_mtime < cutoff
            else:
                continue
            if stale:
                size = path.stat().st_size
                if not dry_run:
                    path.unlink(missing_ok=True)
                result.removed.append(path)
                result.freed_bytes += size


def _filesystem_now(artifact_dir: Path) -> float:
    """Now on the clock that stamps the cache's mtimes: on a shared volume (NFS) that is the
    file server's, which a pruning host's own clock may be far from."""
    probe = artifact_dir / ".prune.lock"
    try:
        os.utime(probe)
        return probe.stat().st_mtime
    except OSError:  # a read-only cache: this host's clock, the best there is
        return time.time()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
