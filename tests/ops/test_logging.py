"""Structured logs: JSON lines with correlation fields, text on a terminal."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from segsvc.logging_setup import configure_logging, log_context, use_json
from segsvc.settings import Settings
from segsvc.webhooks.delivery import deliver
from tests.segsvc.webhooks.receiver import LOOPBACK_ONLY, Receiver


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def configured() -> Iterator[list[logging.Handler]]:
    handlers: list[logging.Handler] = []
    level = logging.getLogger().level
    yield handlers
    for handler in handlers:
        logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)


def setup(configured: list[logging.Handler], stream: io.StringIO, fmt: str) -> None:
    settings = Settings(log_format=fmt, _env_file=None)  # type: ignore[call-arg, arg-type]
    configured.append(configure_logging(settings, service="worker", stream=stream))


def test_json_log_lines_carry_bound_and_extra_correlation_fields(configured) -> None:  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    setup(configured, stream, "json")
    log = logging.getLogger("segsvc.test")
    with log_context(request_id="r-1", model_version="v7"):
        log.info("job done", extra={"job_id": "j-1", "batch_size": 4})
        with log_context(job_id="j-2"):
            log.warning("multi\nline %s", "message")
    log.info("outside")
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first | {"ts": None} == {
        "ts": None,
        "level": "INFO",
        "logger": "segsvc.test",
        "message": "job done",
        "service": "worker",
        "request_id": "r-1",
        "model_version": "v7",
        "job_id": "j-1",
        "batch_size": 4,
    }
    assert second["job_id"] == "j-2"
    assert second["message"] == "multi\nline message"
    assert "request_id" not in third
    assert "job_id" not in third


def test_json_exception_stays_on_one_line(configured) -> None:  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    setup(configured, stream, "json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("segsvc.test").exception("failed", extra={"job_id": "j-9"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert "ValueError: boom" in record["exc_info"]
    assert record["job_id"] == "j-9"


def test_auto_format_is_text_on_a_terminal_and_json_otherwise(configured) -> None:  # type: ignore[no-untyped-def]
    assert use_json("auto", Tty()) is False
    assert use_json("auto", io.StringIO()) is True
    assert use_json("text", io.StringIO()) is False
    stream = Tty()
    setup(configured, stream, "auto")
    with log_context(job_id="j-3"):
        logging.getLogger("segsvc.test").info("hello")
    line = stream.getvalue().strip()
    assert line.endswith("segsvc.test [job_id=j-3] hello")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_configure_logging_twice_keeps_one_handler(configured) -> None:  # type: ignore[no-untyped-def]
    setup(configured, io.StringIO(), "json")
    stream = io.StringIO()
    setup(configured, stream, "json")
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "segsvc"]
    assert len(ours) == 1
    logging.getLogger("segsvc.test").info("once")
    assert len(stream.getvalue().splitlines()) == 1


def test_a_webhook_delivery_logs_no_credentials_of_its_url(  # type: ignore[no-untyped-def]
    configured, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx logs every request's whole URL at INFO ("HTTP Request: POST
    http://user:hunter2@...?token=..."): at the service's INFO level a receiver's credentials
    went to the logs, past `loggable_url`."""
    stream = io.StringIO()
    setup(configured, stream, "json")
    receiver = Receiver()
    receiver.thread.start()
    try:
        port = receiver.server.server_address[1]
        url = f"http://user:hunter2@127.0.0.1:{port}/ok?token=SECRET-TOKEN-42"
        cfg = Settings(webhook_allow_networks=LOOPBACK_ONLY, _env_file=None)  # type: ignore[call-arg]
        outcome = deliver(url=url, body="{}", headers={}, settings=cfg)
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
    assert outcome.kind == "delivered"
    assert [r.path for r in receiver.requests] == ["/ok?token=SECRET-TOKEN-42"]
    logged = [stream.getvalue(), *(r.getMessage() for r in caplog.records)]
    for secret in ("hunter2", "SECRET-TOKEN-42"):
        assert not [line for line in logged if secret in line], logged
    for name in ("httpx", "httpcore"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
