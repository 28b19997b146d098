from __future__ import annotations

import pytest
from sqlalchemy import update

from segsvc.db import session_scope
from segsvc.errors import UnauthorizedError
from segsvc.models import ApiKey, utcnow
from segsvc.services import keys
from segsvc.settings import Settings


def test_create_key_stores_only_its_hash(settings: Settings) -> None:
    with session_scope(settings) as session:
        row, plaintext = keys.create_key(session=session, name="n")
        assert row.key_hash == keys.hash_key(plaintext)
        assert plaintext not in (row.key_hash, row.prefix)


def test_authenticate_cached_remembers_until_ttl(settings: Settings) -> None:
    keys._auth_cache.clear()
    with session_scope(settings) as session:
        _, key = keys.create_key(session=session, name="n")
        first = keys.authenticate_cached(session=session, key=key)
        session.execute(update(ApiKey).values(revoked_at=utcnow()))
        assert keys.authenticate_cached(session=session, key=key) == first  # within the TTL
        keys._auth_cache.clear()  # what AUTH_CACHE_SECONDS passing does
        with pytest.raises(UnauthorizedError):
            keys.authenticate_cached(session=session, key=key)


def test_authenticate_cached_does_not_remember_failures(settings: Settings) -> None:
    keys._auth_cache.clear()
    with session_scope(settings) as session, pytest.raises(UnauthorizedError):
        keys.authenticate_cached(session=session, key="seg_unknown")
    assert keys._auth_cache == {}
