"""Bearer API keys on every /v1 endpoint; `g.client` is the caller."""

from __future__ import annotations

from flask import g, request

from api.context import db, settings
from segsvc.errors import ForbiddenError, UnauthorizedError
from segsvc.services.keys import Client, authenticate_cached

ANONYMOUS = Client(id=None, name="anonymous", is_admin=True)


def authenticate_request() -> None:
    """Resolve the Authorization header to a client (before every /v1 request)."""
    if not settings().auth_required:
        g.client = ANONYMOUS
        return
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise UnauthorizedError("Send your API key as 'Authorization: Bearer <key>'.")
    session = db()
    g.client = authenticate_cached(session=session, key=key.strip())
    # End the lookup's transaction (when the key was not cached) before the body is read: a slow
    # upload must not hold a pooled connection idle in a transaction, which Postgres would end
    # at SEG_DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS, failing the request.
    if session.in_transaction():
        session.rollback()


def current_client() -> Client:
    """The authenticated caller."""
    client: Client = g.client
    return client


def require_admin() -> Client:
    """The caller, who must hold an admin key."""
    client = current_client()
    if not client.is_admin:
        raise ForbiddenError("This operation needs an admin API key.")
    return client
