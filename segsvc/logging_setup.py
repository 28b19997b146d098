"""Structured logs: one JSON object per line with correlation fields, plain text on a terminal.

Correlation fields (`job_id`, `model_version`, `request_id`) come from `log_context(...)` /
`bind_context(...)` (contextvars, so they follow a request or a task across functions) or from
a call's `extra={...}`; the `extra` value wins.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from segsvc.settings import Settings

CORRELATION_FIELDS = ("job_id", "model_version", "request_id")
# Loggers held at WARNING whatever SEG_LOG_LEVEL says: httpx logs every request's full URL at
# INFO ("HTTP Request: POST http://user:password@host/hook?token=..."), a webhook receiver's
# credentials among them, past `segsvc.webhooks.ssrf.loggable_url`; httpcore, at DEBUG, its
# connections and headers.
QUIET_LOGGERS = ("httpx", "httpcore")

_context: ContextVar[dict[str, str]] = ContextVar("segsvc_log_context", default={})  # noqa: B039


def bind_context(**fields: object) -> Token[dict[str, str]]:
    """Add correlation fields for the rest of this context; undo with `reset_context`."""
    merged = dict(_context.get())
    merged.update({k: str(v) for k, v in fields.items() if v is not None})
    return _context.set(merged)


def reset_context(token: Token[dict[str, str]]) -> None:
    """Drop the fields bound by the matching `bind_context`."""
    _context.reset(token)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Correlation fields for the log lines inside the block."""
    token = bind_context(**fields)
    try:
        yield
    finally:
        reset_context(token)


def current_context() -> dict[str, str]:
    """The correlation fields bound now."""
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the bound correlation fields (and the service name) onto each record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        pairs = [f"{k}={getattr(record, k)}" for k in CORRELATION_FIELDS if hasattr(record, k)]
        record.correlation = f" [{' '.join(pairs)}]" if pairs else ""
        return True


class _Json(JsonFormatter):
    """JSON with the text-only `correlation` helper field left out."""

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data.pop("correlation", None)


def use_json(log_format: str, stream: TextIO) -> bool:
    """JSON unless asked for text, or `auto` on an interactive terminal."""
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return log_format == "json"


def build_formatter(json_lines: bool) -> logging.Formatter:
    """The JSON or the text formatter."""
    if json_lines:
        return _Json(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
        )
    return logging.Formatter("%(asctime)s %(levelname)-7s %(name)s%(correlation)s %(message)s")


def configure_logging(
    settings: Settings, *, service: str, stream: TextIO | None = None
) -> logging.Handler:
    """Route the root logger to one stream handler (replacing ours from an earlier call), the
    HTTP client's request lines (which name whole URLs, credentials included) left out."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(build_formatter(use_json(settings.log_format, stream)))
    handler.addFilter(ContextFilter(service))
    handler.set_name("segsvc")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "segsvc"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
