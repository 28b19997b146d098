"""Which folder is the blob store: a mark file in it, and the same id in Postgres.

With `SEG_BLOB_STORE=fs` the rows hold pointers to files under `SEG_BLOB_DIR`. A volume that
is not mounted there leaves a folder at that path (an empty mount point, or one the store
would create on the container's own disk): uploads written to it are hidden by the next
mount, and results that are on the volume read as missing (410 Gone, which clients take as
final). So the first process to use the store writes a random id to `<blob_dir>/.segsvc-store`
and records it in `blob_store_mark`; from then on a folder without that file, or with
another id (another deployment's volume), is refused before it is written, read or swept, as
is a marked folder the database has no mark for (unless it names files in a store):
`StoreNotMarkedError`, a 503 with Retry-After (workers release the batch and retry), and an
error in the log saying what is wrong. When the volume is back, the next check passes.

To move the files to a new volume, copy `.segsvc-store` along. `segsvc blobs adopt` marks the
folder now at `SEG_BLOB_DIR` as the store (a new, empty one on purpose: jobs whose files were
in the old store then answer 410).

A good check is trusted for `RECHECK_S` per process and folder; a failed one always asks
Postgres again (a cached id never refuses a folder on its own).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path

from sqlalchemy import Executable, insert, select, text
from sqlalchemy.orm import Session

from segsvc.blobs import BlobStoreUnavailableError
from segsvc.db import session_scope
from segsvc.files import fsync_folder, make_folders_durably
from segsvc.models import MASK_POINTER_WHERE, BlobStoreMark, Job
from segsvc.settings import Settings

log = logging.getLogger(__name__)

MARK_FILE = ".segsvc-store"
RECHECK_S = 10.0
_REFUSAL_LOG_EVERY_S = 60.0

_checked: dict[tuple[str | None, str], float] = {}  # (database, folder) -> when it last passed
_refusals_logged: dict[str, float] = {}
_lock = threading.Lock()


class StoreNotMarkedError(BlobStoreUnavailableError):
    """The blob folder is not the store the database's pointers name (no mark, or another
    one): as a volume that is away, a 503 with Retry-After; the log says which."""


def read_mark(root: Path) -> str | None:
    """The id in the folder's mark file; None when there is none (or no folder). An empty
    one is being written in place (`_create_exclusively`): read again for a moment."""
    for _ in range(_EMPTY_MARK_READS):
        try:
            found = (root / MARK_FILE).read_text(encoding="ascii").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as exc:  # there, but unreadable: the volume's
            raise BlobStoreUnavailableError() from exc
        if found:
            return found
        time.sleep(0.05)
    return None


_EMPTY_MARK_READS = 20


def write_mark(root: Path, store_id: str, *, replace: bool = False) -> str:
    """Write `store_id` as the folder's mark, durably (creating the folder); unless `replace`,
    a mark another process wrote first is kept. The mark the folder then has."""
    try:
        make_folders_durably(root)
        tmp = root / f"{MARK_FILE}.{secrets.token_hex(8)}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(store_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            if replace:
                os.replace(tmp, root / MARK_FILE)
            else:
                os.link(tmp, root / MARK_FILE)  # atomic, and fails if one is there
        except FileExistsError:
            pass
        except OSError:  # no hard links here (an SMB share, an S3 mount): EPERM, ENOTSUP
            _create_exclusively(root / MARK_FILE, store_id)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_folder(root)
    except OSError as exc:
        raise BlobStoreUnavailableError() from exc
    found = read_mark(root)
    assert found is not None  # just written (or another process's, kept)
    return found


def _create_exclusively(path: Path, store_id: str) -> None:
    """Create the mark unless one is there, writing it in place (a reader that finds it empty
    reads again: `read_mark`)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    try:
        os.write(fd, (store_id + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def check_mark(settings: Settings, root: Path, *, create: bool) -> None:
    """Refuse (`StoreNotMarkedError`) a folder that is not the database's blob store.

    `create` (a write): a store the database has no mark for, in a folder without one, is
    marked now. Without it (a read, a sweep), such a store passes unmarked (a store in use
    before marks existed, until its first write). A marked folder the database names no store
    for is refused, after waiting `MARK_ROW_WAIT_S` for the row of a process of this deployment
    that is marking it this moment, unless the database names files in a store (its mark row
    was dropped by a downgrade): it is another deployment's, or the database was restored from
    before its first file, and its sweep would delete every file it does not name. `segsvc
    blobs adopt` makes it this database's store. An empty marked folder (only its mark: a first
    write whose row never committed) is recorded as the store, having nothing to lose."""
    key = (settings.database_url, str(root))
    if time.monotonic() - _checked.get(key, float("-inf")) < RECHECK_S:
        return
    with session_scope(settings) as session:
        row = _mark_row(session)
        # After the row: a mark is written before its row commits, so a process that found
        # the row finds the mark (read first, a store being marked at once looked unmarked).
        found = read_mark(root)
        if row is None and found is None:
            if not create:
                return
            ours = secrets.token_hex(16)
            found = write_mark(root, ours)
            if found == ours:  # another process's mark, written first, is not ours to record
                row = _record(session, found, root)
    if row is None:
        row = _wait_for_row(settings, key) or _record_if_ours(settings, root, found)
        if row is None:
            with _lock:
                _refused[key] = time.monotonic()
            _log_foreign(root, found)
            raise StoreNotMarkedError()
    if found != row[0]:
        _log_refusal(root, found, row[0], row[1])
        raise StoreNotMarkedError()
    with _lock:
        _checked[key] = time.monotonic()


# How long a check that finds the folder marked and no row waits for one: the process that
# wrote the mark commits its row right after it (first writes at once: they all agree on it).
# Under /readyz's 2 s, and not again for RECHECK_S once such a folder was refused (`_refused`):
# every read, write and probe of a refused store waited it out.
MARK_ROW_WAIT_S = 1.5
_refused: dict[tuple[str | None, str], float] = {}  # (database, folder) -> when refused so


def _mark_row(session: Session) -> tuple[str, str] | None:
    """The database's store (its id, and where it was marked), read afresh."""
    row = session.execute(select(BlobStoreMark.store_id, BlobStoreMark.root)).first()
    return (row.store_id, row.root) if row is not None else None


def _record(session: Session, store_id: str, root: Path) -> tuple[str, str] | None:
    """Record `store_id` as the database's store (unless another process just did) and read
    back the row that stands."""
    values = {"id": 1, "store_id": store_id, "root": str(root)}
    session.execute(_insert_if_absent(session.get_bind().dialect.name, values))
    return _mark_row(session)


def _record_if_ours(settings: Settings, root: Path, found: str | None) -> tuple[str, str] | None:
    """Record the folder's mark as the database's store when the database names files in a
    store (its result masks are pointers): its mark row was dropped (a downgrade past
    migration 0012, then an upgrade), not made elsewhere; or when the folder holds no file but
    its mark: this deployment's first write, cut short (the database away, the pod killed)
    between the mark and its row, and a sweep there has nothing to delete. A database that
    names no file (a new deployment, one restored from before its first file) records no
    folder that holds files."""
    if found is None:
        return None
    with session_scope(settings) as session:
        names_files = session.scalar(
            select(Job.id).where(text(MASK_POINTER_WHERE)).limit(1)  # a partial index's scan
        )
        empty = names_files is None and not _holds_files(root)
        if names_files is None and not empty:
            return None
        row = _record(session, found, root)
    why = (
        "the folder holds no file yet: a first write whose row never committed"
        if empty
        else "the database names files in a store but had no mark: its table was dropped by a "
        "downgrade"
    )
    log.warning(
        "blob folder %s: recorded its mark %s... as this database's store (%s)",
        root,
        found[:12],
        why,
    )
    return row


def _holds_files(root: Path) -> bool:
    """Whether the folder holds anything but dot-files (its mark, temporary files): the files
    are under two-level folders named by their digest (`segsvc.blobs`)."""
    try:
        return any(not entry.name.startswith(".") for entry in os.scandir(root))
    except OSError as exc:
        raise BlobStoreUnavailableError() from exc


def _wait_for_row(settings: Settings, key: tuple[str | None, str]) -> tuple[str, str] | None:
    """The database's store, waited for up to MARK_ROW_WAIT_S (read once if the folder was
    refused within RECHECK_S)."""
    refused_at = _refused.get(key, float("-inf"))
    wait = 0.0 if time.monotonic() - refused_at < RECHECK_S else MARK_ROW_WAIT_S
    deadline = time.monotonic() + wait
    while True:
        with session_scope(settings) as session:
            row = _mark_row(session)
        if row is not None or time.monotonic() >= deadline:
            return row
        time.sleep(0.1)


def adopt(settings: Settings, root: Path) -> tuple[str, bool]:
    """Mark `root` as the database's blob store (`segsvc blobs adopt`): the database's id (a
    new one if it has none) written to the folder, and the folder recorded. The id, and
    whether the folder had another mark or none before."""
    with session_scope(settings) as session:
        row = session.get(BlobStoreMark, 1)
        if row is None:
            row = BlobStoreMark(id=1, store_id=secrets.token_hex(16), root=str(root))
            session.add(row)
        before = read_mark(root)
        write_mark(root, row.store_id, replace=True)
        row.root = str(root)
        store_id = row.store_id
    forget()
    return store_id, before != store_id


def forget() -> None:
    """Drop this process's good checks (the next use checks again)."""
    with _lock:
        _checked.clear()
        _refused.clear()
        _refusals_logged.clear()


def _insert_if_absent(dialect: str, values: dict[str, object]) -> Executable:
    """INSERT ... ON CONFLICT DO NOTHING: another process may mark the store at once."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(BlobStoreMark).values(**values).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(BlobStoreMark).values(**values).on_conflict_do_nothing()
    return insert(BlobStoreMark).values(**values)


def _log_foreign(root: Path, found: str | None) -> None:
    """Say why a marked folder is refused to a database that names no store (once a minute)."""
    if not _first_in_a_minute(root):
        return
    log.error(
        "blob folder %s is store %s... (its %s), but this database has never marked a store: "
        "another deployment's volume, or a database restored from before its first file? Its "
        "files are neither written, read nor swept (a sweep would delete every file this "
        "database does not name). If this folder is this database's store, `segsvc blobs "
        "adopt` records it.",
        root,
        (found or "")[:12],
        MARK_FILE,
    )


def _first_in_a_minute(root: Path) -> bool:
    now = time.monotonic()
    with _lock:
        if now - _refusals_logged.get(str(root), float("-inf")) < _REFUSAL_LOG_EVERY_S:
            return False
        _refusals_logged[str(root)] = now
    return True


def _log_refusal(root: Path, found: str | None, expected: str, marked_at: str) -> None:
    """Say what is wrong, once a minute per folder (every write and read is refused)."""
    if not _first_in_a_minute(root):
        return
    if found is None:
        what = f"has no {MARK_FILE} file: is the volume mounted at {root}?"
    else:
        what = f"is another store ({MARK_FILE} says {found[:12]}...)"
    log.error(
        "blob folder %s %s The database's files are in store %s... (marked at %s). Writes and "
        "reads of files are refused (503) until it is; `segsvc blobs adopt` makes this folder "
        "the store (a new, empty one on purpose: jobs whose files were in the other answer "
        "410).",
        root,
        what,
        expected[:12],
        marked_at,
    )
