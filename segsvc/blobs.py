"""Where uploaded inputs and result masks live: in the jobs rows (`db`) or in files (`fs`).

`settings.blob_store` picks the store for new writes. A row's binary column then holds either
the bytes themselves or a small pointer (`segsvc-blob:sha256:<hex>`) to a content-addressed
file under `settings.blob_dir`. Reads resolve both forms, so switching the setting never strands
old rows. The `fs` layout (`ab/cd/<sha256>`) maps one-to-one onto an S3-compatible bucket
(mount it, or swap this class for one on boto3 with the same three methods).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Protocol

from segsvc.errors import UnavailableError
from segsvc.files import make_folders_durably, write_atomically
from segsvc.settings import Settings

POINTER_PREFIX = b"segsvc-blob:sha256:"
POINTER_LENGTH = len(POINTER_PREFIX) + 64
_HEX = frozenset("0123456789abcdef")
# A volume that is away (full, read-only, a stale NFS handle) is usually back in
# seconds; a client retries then, as after a database outage (`api.errors.DB_RETRY_AFTER_S`).
STORE_RETRY_AFTER_S = 5.0


class BlobMissingError(LookupError):
    """A row points at a blob that is absent or does not match its hash."""


class BlobStoreUnavailableError(UnavailableError):
    """The blob folder could not be written or read (an OSError other than a missing file):
    transient, a 503 with Retry-After; workers release the batch and retry it like a database
    outage. The OSError (with its path) is the `__cause__`, for the logs only: the message
    is answered to clients as is."""

    code = "blob_store_unavailable"

    def __init__(
        self,
        message: str = "The service's file storage is unavailable; try again shortly.",
        *,
        retry_after: float | None = STORE_RETRY_AFTER_S,
    ) -> None:
        super().__init__(message, retry_after=retry_after)


class BlobStore(Protocol):
    """Stores blobs for rows: `put` returns the value to keep in the row, `get` reverses it."""

    kind: str

    def put(self, data: bytes) -> bytes: ...

    def get(self, value: bytes | None) -> bytes | None: ...


def is_pointer(value: bytes | None) -> bool:
    """True when a row value refers to a file instead of holding the bytes."""
    return value is not None and value.startswith(POINTER_PREFIX)


def pointer_to(digest: str) -> bytes:
    """The row value that names the file of this sha256."""
    return POINTER_PREFIX + digest.encode()


def pointer_digest(value: bytes) -> str:
    """The sha256 a pointer names (validated: a row value never becomes a path trick)."""
    digest = value[len(POINTER_PREFIX) :].decode("ascii", "replace")
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise BlobMissingError(f"malformed blob pointer {value[:80]!r}")
    return digest


def pointer_digests(values: Iterable[bytes | None]) -> set[str]:
    """The sha256 digests the pointers among `values` name (inline bytes and None skipped)."""
    return {pointer_digest(v) for v in values if v is not None and is_pointer(v)}


# Old files a sweep asks the rows about at once (the names only: memory stays at one batch).
SWEEP_BATCH = 1000


# Called before the folder is written (True) or read or swept (False); raises
# `BlobStoreUnavailableError` when the folder is not the database's store
# (`segsvc.blob_mark.check_mark`, which `blob_store` passes).
MarkCheck = Callable[[bool], None]


class FileReader:
    """Resolves pointers against a folder (shared by both stores)."""

    def __init__(self, root: Path | None, check: MarkCheck | None = None) -> None:
        self.root = root
        self._check = check

    def check_mark(self, *, writing: bool) -> None:
        """Refuse a folder that is not the store (see `segsvc.blob_mark`)."""
        if self._check is not None and self.root is not None:
            self._check(writing)

    def path_for(self, digest: str) -> Path:
        """Where the blob with this sha256 lives."""
        if self.root is None:
            raise BlobMissingError("a row points at a file blob but blob_dir is not set")
        return self.root / digest[:2] / digest[2:4] / digest

    def get(self, value: bytes | None) -> bytes | None:
        """The bytes for a row value: itself, or the file its pointer names."""
        if not is_pointer(value):
            return value
        assert value is not None
        digest = pointer_digest(value)
        path = self.path_for(digest)
        self.check_mark(writing=False)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobMissingError(f"blob {digest} is missing") from None
        except OSError as exc:  # there, but unreadable: the volume's trouble, not the row's
            raise BlobStoreUnavailableError() from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobMissingError(f"blob {digest} is corrupt")
        return data

    def delete(self, digests: Iterable[str], *, older_than_s: float) -> int:
        """Delete the files of these sha256 digests (ones no row needs any more), each unless
        used within the grace period; the count. See `_remove_if_stale` for a racing `put`."""
        if self.root is None or not self.root.is_dir():
            return 0
        self.check_mark(writing=False)
        cutoff = time.time() - older_than_s
        return sum(self._remove_if_stale(self.path_for(d), cutoff) for d in set(digests))

    def sweep(self, *, keep: Iterable[bytes | None], older_than_s: float) -> int:
        """Delete every file no kept pointer names and older than the grace period; the count
        (`sweep_checked` with the names taken from `keep`, read only if there is a folder)."""
        if not self.holds_files():
            return 0  # never used: no need to read `keep`
        wanted = pointer_digests(keep)
        return self.sweep_checked(
            lambda batch: wanted.intersection(batch), older_than_s=older_than_s
        )

    def holds_files(self) -> bool:
        """Whether there is a blob folder (a sweep has anything to look at)."""
        return self.root is not None and self.root.is_dir()

    def sweep_checked(
        self,
        in_use: Callable[[list[str]], AbstractSet[str]],
        *,
        older_than_s: float,
        batch: int = SWEEP_BATCH,
    ) -> int:
        """Delete every file older than the grace period that no row names; the count. A full
        pass over the folder (`segsvc blobs sweep`), for orphans no purge knows of: the file of
        an upload whose row never committed, temporary files of crashed writes. Both stores
        sweep: rows written while the setting was `fs` keep their pointers after it changes,
        and their files are swept once those rows let go of them.

        The old files are taken `batch` at a time and `in_use` (the rows' answer for those
        digests) is asked just before they go, so memory stays at one batch however many
        files there are. A row written after that answer names a file that is either new (the
        grace period keeps it) or reused, which `put` marks by refreshing its mtime."""
        if self.root is None or not self.root.is_dir():
            return 0
        self.check_mark(writing=False)  # never another store's files
        cutoff = time.time() - older_than_s
        removed, stale = 0, []
        for path in self.root.glob("??/??/*"):
            try:
                old = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if not old:
                continue
            if path.name.startswith("."):  # the temporary file of a write that crashed
                path.unlink(missing_ok=True)
                continue
            stale.append(path.name)
            if len(stale) >= batch:
                removed += self._remove_unnamed(stale, in_use, cutoff)
                stale = []
        if stale:
            removed += self._remove_unnamed(stale, in_use, cutoff)
        return removed

    def _remove_unnamed(
        self, names: list[str], in_use: Callable[[list[str]], AbstractSet[str]], cutoff: float
    ) -> int:
        named = in_use(names)
        return sum(
            self._remove_if_stale(self.path_for(name), cutoff)
            for name in names
            if name not in named
        )

    @staticmethod
    def _remove_if_stale(path: Path, cutoff: float) -> bool:
        """Delete `path` unless it was written or reused since `cutoff`. It is first renamed
        aside and its mtime checked again there, so a `put` racing the deletion either
        refreshed it in time (it is put back) or found it gone (and wrote it anew)."""
        try:
            if path.stat().st_mtime >= cutoff:
                return False  # new, or reused by a recent upload
            aside = path.with_name(f".{path.name}.{secrets.token_hex(8)}.sweep")
            os.replace(path, aside)
            if aside.stat().st_mtime >= cutoff:
                os.replace(aside, path)  # reused while being deleted: put it back
                return False
            aside.unlink()
        except FileNotFoundError:
            return False  # another sweep or a write got there first
        return True


class DbBlobStore(FileReader):
    """Bytes stay in the row (the default: one database to back up, fine to ~100k jobs/day)."""

    kind = "db"

    def put(self, data: bytes) -> bytes:
        """The row keeps the bytes themselves."""
        return data


class FsBlobStore(FileReader):
    """Content-addressed files; the row keeps a 83-byte pointer."""

    kind = "fs"

    def put(self, data: bytes) -> bytes:
        """Write the file once (atomically; identical blobs share it) and return its pointer.

        Durably: the data, the file's name and any folder made for it are fsynced before the
        pointer is returned, since the row that stores the pointer is committed (and durable)
        next; a power loss must not leave a committed job naming a file that is not there."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_for(digest)
        self.check_mark(writing=True)
        try:
            if not self._refresh(path, len(data)):
                make_folders_durably(path.parent)
                # threads storing the same bytes at once are fine
                write_atomically(path, data, sync_folder=True)
        except OSError as exc:  # a full, read-only or stale volume
            raise BlobStoreUnavailableError() from exc
        return pointer_to(digest)

    @staticmethod
    def _refresh(path: Path, size: int) -> bool:
        """Mark an existing blob as just used (its mtime), so a sweep that started before this
        write's row exists leaves it alone; False when there is no such file, or one of
        another size (damaged: cut short by a disk error or a copy), which is then written
        anew rather than shared by every later identical upload."""
        try:
            if path.stat().st_size != size:
                return False
            os.utime(path)
        except FileNotFoundError:
            return False
        return True


def blob_store(settings: Settings) -> DbBlobStore | FsBlobStore:
    """The store `settings.blob_store` selects (fs defaults to `var_dir/blobs`), checking its
    folder's mark against the database's before files are written, read or swept."""
    from segsvc.blob_mark import check_mark  # it needs the database (and imports this module)

    folder = blob_folder(settings)

    def check(writing: bool) -> None:
        check_mark(settings, folder, create=writing)

    if settings.blob_store == "fs":
        return FsBlobStore(folder, check)
    return DbBlobStore(folder, check)


def blob_folder(settings: Settings) -> Path:
    """The folder of the file blobs (`SEG_BLOB_DIR`, else `var_dir/blobs`)."""
    return settings.blob_dir or (settings.var_dir / "blobs")
