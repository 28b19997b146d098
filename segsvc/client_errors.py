"""Typed errors of the Python client; API errors carry the API's `error` code."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import httpx


class ClientError(Exception):
    """Base of every error the client raises."""


class InvalidUrlError(ClientError, ValueError):
    """A server URL that cannot be one (no http:// or https://, no host, a port that is not a
    number from 1 to 65535): refused when the client is made, before anything is sent."""


class InvalidKeyError(ClientError, ValueError):
    """An API key that no HTTP header can carry (a space, a control character, a letter outside
    plain ASCII: often pasted along with it): refused when the client is made."""


class TransportError(ClientError):
    """The service could not be reached or the connection broke."""


class WaitTimeoutError(ClientError):
    """A job did not finish within the wait's timeout."""


class WaitStoppedError(ClientError):
    """A wait was told to stop (its `stop` event was set) before the jobs ended."""


class RetriesStoppedError(WaitStoppedError):
    """A request was not retried because `Client.stop_retries()` was called (Ctrl-C): its
    last try got an answer to retry, or none (a submit's may then have been stored)."""


class ApiError(ClientError):
    """The API answered with an error: `status`, its `code` and `message`."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class AuthError(ApiError):
    """401 or 403: the API key is missing, wrong or lacks the permission."""


class NotFoundError(ApiError):
    """404: no such job (or it belongs to another key), or no such endpoint."""


class ConflictError(ApiError):
    """409: e.g. the mask of a job that has not succeeded."""


class InvalidRequestError(ApiError):
    """400/413/415/422: the upload or the parameters were refused."""


class RateLimitedError(ApiError):
    """429 after the client's retries ran out."""


class ServerError(ApiError):
    """5xx after the client's retries ran out."""


class RequestTimeoutError(ApiError, TransportError):
    """408 `request_timeout` after the client's retries ran out: the server dropped the
    request because its body stalled on the way (nothing was stored). A network failure, as
    a broken connection is: a TransportError too."""


def error_for(resp: httpx.Response) -> ApiError:
    """The typed error for an error response."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("error") or f"http_{resp.status_code}")
    message = str(body.get("message") or resp.reason_phrase or "error")
    status = resp.status_code
    cls: type[ApiError]
    if status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = NotFoundError
    elif status == 408:
        cls = RequestTimeoutError
    elif status == 409:
        cls = ConflictError
    elif status == 429:
        cls = RateLimitedError
    elif status >= 500:
        cls = ServerError
    else:
        cls = InvalidRequestError
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    return cls(status, code, message, retry_after=retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
