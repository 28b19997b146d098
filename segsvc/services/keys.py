"""API keys: creation (shown once), lookup by hash, listing and revocation."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from segsvc.errors import ConflictError, NotFoundError, UnauthorizedError
from segsvc.models import ApiKey, utcnow

KEY_PREFIX = "seg_"


@dataclass(frozen=True)
class Client:
    """The authenticated caller of a request."""

    id: uuid.UUID | None
    name: str
    is_admin: bool


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(*, session: Session, name: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """Create a key; the plaintext is returned once and never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=hash_key(plaintext), prefix=plaintext[:10], is_admin=is_admin)
    session.add(row)
    session.flush()
    return row, plaintext


def list_keys(*, session: Session) -> list[ApiKey]:
    """Every key, oldest first (revoked ones included: their `revoked_at` says so)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_key(*, session: Session, ref: str) -> ApiKey:
    """Revoke the key named by `ref`: its id, or the prefix `keys list` shows (a trailing
    "..." is allowed). A prefix two keys share is refused rather than guessed; revoking a
    revoked key changes nothing. API processes may still accept it for AUTH_CACHE_SECONDS."""
    ref = ref.strip().removesuffix("...")
    try:
        by_id: uuid.UUID | None = uuid.UUID(ref)
    except ValueError:
        by_id = None
    where = ApiKey.id == by_id if by_id is not None else ApiKey.prefix == ref
    rows = list(session.scalars(select(ApiKey).where(where).with_for_update()))
    if not rows:
        raise NotFoundError(f"No API key has the id or prefix {ref!r}.")
    if len(rows) > 1:
        raise ConflictError(f"{len(rows)} keys share the prefix {ref!r}: revoke one by its id.")
    (row,) = rows
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


# Keys seen recently, by hash: the API checks a key on every request, and a database round trip
# for each is a fifth of a submit's cost. A revoked key stops working within this many seconds.
AUTH_CACHE_SECONDS = 30.0
_AUTH_CACHE_MAX = 10_000
_auth_cache: dict[str, tuple[float, Client]] = {}


def authenticate_cached(*, session: Session, key: str) -> Client:
    """`authenticate`, remembered per process for AUTH_CACHE_SECONDS (failures are not kept)."""
    digest = hash_key(key)
    now = time.monotonic()
    hit = _auth_cache.get(digest)
    if hit is not None and hit[0] > now:
        return hit[1]
    client = authenticate(session=session, key=key)
    if len(_auth_cache) >= _AUTH_CACHE_MAX:
        _auth_cache.clear()
    _auth_cache[digest] = (now + AUTH_CACHE_SECONDS, client)
    return client


def authenticate(*, session: Session, key: str) -> Client:
    """The client owning `key`, or UnauthorizedError."""
    row = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    if row is None:
        raise UnauthorizedError("The API key is not valid.")
    return Client(id=row.id, name=row.name, is_admin=row.is_admin)
