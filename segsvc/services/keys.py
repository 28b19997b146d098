"""API keys: creation (shown once), lookup by hash."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from segsvc.errors import UnauthorizedError
from segsvc.models import ApiKey

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
