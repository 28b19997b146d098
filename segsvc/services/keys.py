"""API keys: creation (shown once), lookup by hash."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from segsvc.errors import UnauthorizedError
from segsvc.models import ApiKey

KEY_PREFIX = "seg_"


@dataclass(frozen=True)
class Client:
    """The authenticated caller of a request."""

    id: object
    name: str
    is_admin: bool


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(*, session: Session, name: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """Create a key; the plaintext is returned once and never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name, key_hash=hash_key(plaintext), prefix=plaintext[:10], is_admin=is_admin
    )
    session.add(row)
    session.flush()
    return row, plaintext


def authenticate(*, session: Session, key: str) -> Client:
    """The client owning `key`, or UnauthorizedError."""
    row = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    if row is None:
        raise UnauthorizedError("The API key is not valid.")
    return Client(id=row.id, name=row.name, is_admin=row.is_admin)
