"""Pruning the model files retraining writes to `var_dir/models`, so that they do not pile up.

Each run writes its candidate there as `ft-<stamp>-<run>.keras` (tens of MB; `candidate_path`)
with the training report (`.json`) and the comparison sheet (`.png`) beside it, and registers
it. `prune_model_files` deletes, once older than `SEG_MODEL_FILE_GRACE_DAYS`:

- the files of **rejected** versions, rejected that long ago too (an operator can inspect one
  meanwhile). The row stays, with `file_deleted_at` set; `rollout.promote` then refuses it;
- files **no version names**: a run that crashed before registering its candidate. Only while
  this pass holds the retraining lock (a run registers its file at its end): when a run is
  going on they wait for the next pass. So do the scratch folders (`var_dir/retrain/<run id>`)
  of runs that died before removing theirs;
- the files of **archived** versions (production before a promotion) past the rollback
  targets, archived that long ago too: production's parent and the `SEG_MODEL_KEEP_ARCHIVED`
  most recently archived stay (an operator may promote one, a rollback returns to one).

The files of production, canary and candidate versions always stay. Only files of that
naming directly in `var_dir/models` are looked at: never the shipped model copied there
(`baseline.keras`) or the untrained `init.keras`, never a path outside, whatever a row says.
A file whose name a row gives with another folder is kept (a volume mounted elsewhere before:
it may be that file).

Safe against concurrent use:

- one pruner at a time (`.prune.lock` in the folder); another skips its pass;
- what to delete is decided under the registry lock (`rollout.lock_registry`), in the
  transaction that marks the rows: a promote of a version being pruned waits, then refuses;
- a file is renamed aside (`.<name>.prune-<token>`) and deleted only once its rows' marks are
  committed; a failed commit puts it back, and so does the next pass for a pruner that died.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from segsvc.db import session_scope
from segsvc.files import try_lock
from segsvc.models import ModelStatus, ModelVersion, db_time
from segsvc.retrain_lock import retrain_lock
from segsvc.services import rollout
from segsvc.settings import Settings

log = logging.getLogger(__name__)

DAY_S = 86400.0
# `candidate_path`'s names, and its training report's and comparison sheet's beside it
NAME = r"(?P<stem>ft-\d{8}-\d{6}-[0-9a-f]{6})\.(?:keras|json|png)"
CANDIDATE = re.compile(NAME)
ASIDE = re.compile(rf"\.(?P<name>{NAME})\.prune-[0-9a-f]{{8}}")  # `_set_aside`'s
# The temporary files a candidate and its report are written through (`replace_atomically`):
# left behind only by a process killed mid-write.
TEMPORARY = re.compile(r"\.ft-\d{8}-\d{6}-[0-9a-f]{6}\.\S*\.tmp(?:\.keras)?")


@dataclass
class ModelFilesPruneResult:
    """What one pass did (in a dry run: would do)."""

    removed: list[Path] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # versions whose files went
    archived: list[str] = field(default_factory=list)  # of those, archived ones (the rest rejected)
    freed_bytes: int = 0
    skipped: bool = False  # another pruner was running: nothing looked at
    orphans_skipped: bool = False  # a retraining run was going on: files no row names stayed


def models_dir(settings: Settings) -> Path:
    """The folder retraining writes its candidates to."""
    return settings.var_dir / "models"


def candidate_path(settings: Settings, *, run_id: uuid.UUID, at: datetime) -> Path:
    """Where the retraining run `run_id` started `at` writes its candidate (the name the pruner
    knows as this service's own)."""
    return models_dir(settings) / f"ft-{at:%Y%m%d-%H%M%S}-{run_id.hex[:6]}.keras"


def prune_model_files(
    settings: Settings,
    *,
    dry_run: bool = False,
    older_than_s: float | None = None,
    holding_retrain_lock: bool = False,
) -> ModelFilesPruneResult:
    """Delete rejected versions', old archived versions' (past the rollback targets) and
    unregistered candidates' files once older than
    `older_than_s` (default `model_file_grace_days`). `holding_retrain_lock`: the caller is a
    retraining run at its end; otherwise this pass takes the lock, or leaves orphans alone."""
    if older_than_s is None:
        older_than_s = settings.model_file_grace_days * DAY_S
    result = ModelFilesPruneResult()
    folder = models_dir(settings)
    if not folder.is_dir():
        return result
    with try_lock(folder / ".prune.lock") as alone:
        if not alone:
            result.skipped = True
        elif holding_retrain_lock:
            _prune(settings, folder, older_than_s, dry_run, orphans=True, result=result)
        else:
            with retrain_lock(settings) as idle:
                _prune(settings, folder, older_than_s, dry_run, orphans=bool(idle), result=result)
    return result


def _prune(
    settings: Settings,
    folder: Path,
    older_than_s: float,
    dry_run: bool,
    *,
    orphans: bool,
    result: ModelFilesPruneResult,
) -> None:
    result.orphans_skipped = not orphans
    if not dry_run:
        _restore_aside(folder)
    cutoff = time.time() - older_than_s
    aside: list[tuple[Path, Path]] = []  # (where it is now, where it was)
    try:
        with session_scope(settings) as session:
            rollout.lock_registry(session)
            owners = _owners(session)
            kept = _rollback_targets(session, settings.model_keep_archived)
            # Files age on the file system's clock; rows retire on the database's.
            retired_before = db_time(session) - timedelta(seconds=older_than_s)
            for stem, paths in sorted(_candidates(folder).items()):
                rows = owners.get(f"{stem}.keras", [])
                try:
                    if not _deletable(
                        folder / f"{stem}.keras",
                        paths,
                        rows,
                        cutoff,
                        retired_before,
                        orphans,
                        kept,
                    ):
                        continue
                    size = sum(p.stat().st_size for p in paths)
                    if not dry_run:
                        aside += _set_aside(paths)
                        for row in rows:
                            row.file_deleted_at = row.file_deleted_at or db_time(session)
                except OSError:  # one file's trouble (a permission, a stale handle) stops no other
                    log.warning("could not prune %s", folder / stem, exc_info=True)
                    continue
                result.removed += paths
                result.freed_bytes += size
                result.versions += [row.version for row in rows]
                result.archived += [r.version for r in rows if r.status == ModelStatus.ARCHIVED]
    except BaseException:
        for now, was in aside:
            with suppress(OSError):
                os.rename(now, was)
        raise
    for now, _ in aside:
        now.unlink(missing_ok=True)
    if orphans:
        _prune_scratch(settings.var_dir / "retrain", cutoff, dry_run, result)
        _prune_temporary(folder, cutoff, dry_run, result)


def _prune_temporary(
    folder: Path, cutoff: float, dry_run: bool, result: ModelFilesPruneResult
) -> None:
    """Delete the temporary files of candidate writes killed mid-way (tens of MB each), once
    unchanged since `cutoff`. Only while no run is going on (the caller holds the lock)."""
    for path in sorted(folder.iterdir()):
        if not TEMPORARY.fullmatch(path.name) or path.is_symlink() or not path.is_file():
            continue
        try:
            stat = path.stat()
            if stat.st_mtime >= cutoff:
                continue
            if not dry_run:
                path.unlink()
        except OSError:
            log.warning("could not prune %s", path, exc_info=True)
            continue
        result.removed.append(path)
        result.freed_bytes += stat.st_size


def _prune_scratch(
    folder: Path, cutoff: float, dry_run: bool, result: ModelFilesPruneResult
) -> None:
    """Delete the scratch folders (`var_dir/retrain/<run id>`: a checkpoint) of runs that died
    before removing them, once nothing in one was written since `cutoff`. Only while no run is
    going on (the caller holds the retraining lock)."""
    if not folder.is_dir():
        return
    for run in sorted(folder.iterdir()):
        try:
            uuid.UUID(run.name)
        except ValueError:
            continue  # not a run's folder
        if run.is_symlink() or not run.is_dir():
            continue
        try:
            files = [p for p in run.rglob("*") if p.is_file() and not p.is_symlink()]
            if max((p.stat().st_mtime for p in [run, *files]), default=0.0) >= cutoff:
                continue
            size = sum(p.stat().st_size for p in files)
            if not dry_run:
                shutil.rmtree(run)
        except OSError:
            log.warning("could not prune %s", run, exc_info=True)
            continue
        result.removed.append(run)
        result.freed_bytes += size


def _rollback_targets(session: Session, keep: int) -> set[str]:
    """The archived versions a rollback may restore: production's parent and the `keep` most
    recently archived."""
    production = session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.PRODUCTION)
    ).first()
    newest = session.scalars(
        select(ModelVersion.version)
        .where(ModelVersion.status == ModelStatus.ARCHIVED)
        .order_by(ModelVersion.retired_at.desc().nulls_last(), ModelVersion.created_at.desc())
        .limit(keep)
    ).all()
    parent = production.parent_version if production is not None else None
    return {*newest, *([parent] if parent else [])}


def _deletable(
    path: Path,
    paths: list[Path],
    rows: list[ModelVersion],
    cutoff: float,
    retired_before: datetime,
    orphans: bool,
    kept: set[str],
) -> bool:
    """Whether the files of the candidate `path` (with its report) may go now: written before
    `cutoff` (the file system's clock) and, if registered, by versions rejected or archived
    past the rollback targets (`kept`), retired before `retired_before` (the database's)."""
    if not rows:
        return orphans and max(p.stat().st_mtime for p in paths) < cutoff

    def gone(row: ModelVersion) -> bool:
        return row.status == ModelStatus.REJECTED or (
            row.status == ModelStatus.ARCHIVED and row.version not in kept
        )

    if not all(gone(row) and _names(row, path) for row in rows):
        return False
    if all(row.file_deleted_at is not None for row in rows):
        return True  # a pass committed its deletion, then died before removing it
    retired = max(row.retired_at or row.created_at for row in rows)
    return retired < retired_before and max(p.stat().st_mtime for p in paths) < cutoff


def _candidates(folder: Path) -> dict[str, list[Path]]:
    """This service's candidate files in `folder` by stem: regular files only (no links)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        match = CANDIDATE.fullmatch(path.name)
        if match is not None and not path.is_symlink() and path.is_file():
            found[match["stem"]].append(path)
    return found


def _owners(session: Session) -> dict[str, list[ModelVersion]]:
    """Every registry row by the name of its file (whatever its folder)."""
    owners: dict[str, list[ModelVersion]] = defaultdict(list)
    for row in session.scalars(select(ModelVersion)):
        owners[Path(row.path).name].append(row)
    return owners


def _names(row: ModelVersion, path: Path) -> bool:
    """Whether `row` is the version of the file `path` (not one of that name elsewhere)."""
    return Path(row.path).resolve().parent == path.parent.resolve()


def _set_aside(paths: list[Path]) -> list[tuple[Path, Path]]:
    """Rename `paths` aside, all or (putting back those moved) none."""
    moved: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            aside = path.with_name(f".{path.name}.prune-{secrets.token_hex(4)}")
            os.rename(path, aside)
            moved.append((aside, path))
    except OSError:
        for now, was in moved:
            with suppress(OSError):
                os.rename(now, was)
        raise
    return moved


def _restore_aside(folder: Path) -> None:
    """Put back files a pruner renamed aside and did not delete (it died): decided afresh."""
    for path in folder.iterdir():
        match = ASIDE.fullmatch(path.name)
        if match is None:
            continue
        with suppress(OSError):
            if (folder / match["name"]).exists():
                path.unlink()
            else:
                os.rename(path, folder / match["name"])
