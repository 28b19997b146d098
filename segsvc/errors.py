"""Typed errors with one base class; `api/errors.py` maps them to JSON once."""

from __future__ import annotations


class SegError(Exception):
    """Base error: a machine-readable `code`, an HTTP status and a message for people."""

    code = "error"
    http_status = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequestError(SegError):
    code = "bad_request"
    http_status = 400


class UnauthorizedError(SegError):
    code = "unauthorized"
    http_status = 401


class ForbiddenError(SegError):
    code = "forbidden"
    http_status = 403


class NotFoundError(SegError):
    code = "not_found"
    http_status = 404


class ConflictError(SegError):
    code = "conflict"
    http_status = 409


class GoneError(SegError):
    code = "gone"
    http_status = 410


class PayloadTooLargeError(SegError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaTypeError(SegError):
    code = "unsupported_media_type"
    http_status = 415


class InvalidImageError(SegError):
    code = "invalid_image"
    http_status = 422


class ValidationError(SegError):
    code = "validation_error"
    http_status = 422


class RateLimitedError(SegError):
    code = "rate_limited"
    http_status = 429


class UnavailableError(SegError):
    code = "unavailable"
    http_status = 503


class PoisonInputError(SegError):
    """A stored input the worker cannot process; the job fails without retry."""

    code = "poison_input"
    http_status = 422
