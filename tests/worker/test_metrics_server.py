"""worker/metrics_server.py: the workers' and beat's /metrics listen where SEG_METRICS_BIND
says (every interface in containers, loopback under `segsvc run`)."""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import pytest
from pydantic import ValidationError

from segsvc.settings import Settings, get_settings
from tests.conftest import free_port
from worker import metrics_server


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _server(port: int) -> WSGIServer:
    server = metrics_server._started[port][0]  # type: ignore[index]  # (server, thread)
    assert isinstance(server, WSGIServer)
    return server


def _stop(port: int) -> None:
    server = _server(port)
    del metrics_server._started[port]
    server.shutdown()
    server.server_close()


def test_metrics_server_listens_on_seg_metrics_bind(
    monkeypatch: pytest.MonkeyPatch, fresh_settings: None
) -> None:
    monkeypatch.setenv("SEG_METRICS_BIND", "127.0.0.1")
    port = free_port()
    assert metrics_server.start_metrics_server(port) is True
    server = _server(port)
    try:
        assert server.server_address[:2] == ("127.0.0.1", port)
    finally:
        _stop(port)


def test_metrics_server_listens_on_every_interface_by_default(fresh_settings: None) -> None:
    assert Settings(_env_file=None).metrics_bind == "0.0.0.0"
    port = free_port()
    assert metrics_server.start_metrics_server(port, addr="0.0.0.0") is True
    server = _server(port)
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        _stop(port)


def test_metrics_bind_must_be_an_address() -> None:
    with pytest.raises(ValidationError, match="metrics_bind"):
        Settings(metrics_bind="localhots", _env_file=None)
