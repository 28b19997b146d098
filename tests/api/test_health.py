from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from segsvc.settings import Settings


def test_healthz_is_ok(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_checks_database_and_broker(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_fails_when_broker_unreachable(settings) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    resp = create_app(broken).test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["broker"].startswith("error")


@contextmanager
def silent_server() -> Iterator[int]:
    """A loopback port that takes connections and never answers: a hung server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()  # the connections waiting in its backlog are reset: the checks end


def test_readyz_runs_checks_at_once_and_answers_in_time_when_they_hang(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the checks ran one after the other with 2-5 s timeouts each, past the
    # readinessProbe's 3 s, while holding a request thread.
    from api.app import create_app
    from api.routes import health

    assert health.READY_TIMEOUT_S == 2.0  # the wait below is the one shipped
    with silent_server() as database, silent_server() as broker:
        hung = settings.model_copy(
            update={
                "database_url": f"postgresql+psycopg://segsvc@127.0.0.1:{database}/segsvc",
                "broker_url": f"redis://127.0.0.1:{broker}/0",
            }
        )
        client = create_app(hung).test_client()
        start = time.monotonic()
        resp = client.get("/readyz")
        took = time.monotonic() - start
    assert resp.status_code == 503
    assert resp.get_json()["checks"] == {
        "database": "error: no answer in 2 s",
        "broker": "error: no answer in 2 s",
    }
    assert took < 3.5  # one timeout for both, not one after the other (4 s)
