"""One place that turns errors into `{"error": code, "message": text}` responses."""

from __future__ import annotations

import logging
import math

from flask import Flask, Response, jsonify
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from segsvc.db import is_db_timeout
from segsvc.errors import SegError

try:  # gunicorn's errors for a request body it cannot unframe; the dev server has none
    from gunicorn.http.errors import NoMoreData, ParseException

    BODY_FRAMING_ERRORS: tuple[type[Exception], ...] = (ParseException, NoMoreData)
except ImportError:  # pragma: no cover - gunicorn is installed wherever the API runs
    BODY_FRAMING_ERRORS = ()

log = logging.getLogger(__name__)

DB_RETRY_AFTER_S = 5
# RFC 9110 §11.6.1 / RFC 6750 §3: a 401 names the scheme to authenticate with.
WWW_AUTHENTICATE = 'Bearer realm="segsvc"'


def error_response(
    code: str, message: str, status: int, retry_after: float | None = None
) -> Response:
    """A JSON error response (with Retry-After when given)."""
    resp = jsonify({"error": code, "message": message})
    resp.status_code = status
    if retry_after is not None:
        # Rounded up: a client told fewer seconds than asked retries too early, and is refused.
        resp.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return resp


def handle_seg_error(exc: SegError) -> Response:
    if exc.http_status >= 500 and exc.__cause__ is not None:  # e.g. the blob volume's OSError
        log.warning("%s: %s: %s", exc.code, type(exc.__cause__).__name__, exc.__cause__)
    resp = error_response(exc.code, exc.message, exc.http_status, exc.retry_after)
    if exc.http_status == 401:
        resp.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return resp


def handle_http_error(exc: HTTPException) -> Response:
    code = (exc.name or "error").lower().replace(" ", "_")
    status = exc.code or 500
    if status == 413:
        code = "payload_too_large"
    resp = error_response(code, exc.description or exc.name or "Error.", status)
    for name, value in exc.get_headers():  # e.g. a 405's Allow, a 401's WWW-Authenticate
        if name.lower() != "content-type":
            resp.headers.add(name, value)
    return resp


def handle_db_unavailable(exc: Exception) -> Response:
    log.warning("database unavailable: %s", exc.__class__.__name__)
    return error_response(
        "database_unavailable",
        "The service's database is unavailable; try again shortly.",
        503,
        DB_RETRY_AFTER_S,
    )


def handle_db_timeout(exc: DBAPIError) -> Response:
    # Nothing of the request is kept: its session is closed at teardown (api/context.py), which
    # rolls back what it wrote before the cancelled statement, and the connection is reused.
    statement = " ".join((exc.statement or "").split())[:160]
    log.warning("database statement cancelled (%s): %s", type(exc.orig).__name__, statement)
    return error_response(
        "database_timeout",
        "The database did not answer in time (it is busy, or locked by maintenance); "
        "try again shortly.",
        503,
        DB_RETRY_AFTER_S,
    )


def handle_db_error(exc: OperationalError) -> Response:
    """A statement Postgres cancelled at its statement or lock timeout, else no database."""
    if is_db_timeout(exc):
        return handle_db_timeout(exc)
    return handle_db_unavailable(exc)


def handle_bad_framing(exc: Exception) -> Response:
    """A request body gunicorn could not unframe as the app read it (a bad chunk size or
    terminator, or the client gone mid-chunk): the client's fault, not a 500 with a traceback.
    gunicorn raises these from `wsgi.input` as plain exceptions, which werkzeug lets through
    (all but NoMoreData, an OSError, which it answers as a disconnect itself)."""
    detail = str(exc)[:200]
    log.warning("malformed request body (%s): %s", type(exc).__name__, detail)
    return error_response(
        "bad_request", f"The request body's chunked framing is malformed: {detail}", 400
    )


def handle_unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    return error_response("internal_error", "Something went wrong on our side.", 500)


def register_error_handlers(app: Flask) -> None:
    """Map every error to JSON; 5xx never reveal internals."""
    app.register_error_handler(SegError, handle_seg_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(OperationalError, handle_db_error)
    app.register_error_handler(PoolTimeoutError, handle_db_unavailable)
    app.register_error_handler(DBAPIError, _handle_dbapi)
    for framing_error in BODY_FRAMING_ERRORS:
        app.register_error_handler(framing_error, handle_bad_framing)
    app.register_error_handler(Exception, handle_unexpected)


def _handle_dbapi(exc: DBAPIError) -> Response:
    if exc.connection_invalidated:
        return handle_db_unavailable(exc)
    return handle_unexpected(exc)
