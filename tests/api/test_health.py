from __future__ import annotations


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


def test_readyz_runs_checks_at_once_and_answers_in_time_when_one_hangs(client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Regression: the checks ran one after the other with 2-5 s timeouts each, past the
    # readinessProbe's 3 s, while holding a request thread.
    import time

    from api.routes import health

    monkeypatch.setattr(health, "READY_TIMEOUT_S", 1.0)
    monkeypatch.setattr(health, "_check_broker", lambda app: time.sleep(0.6) or "ok")
    monkeypatch.setattr(health, "_check_database", lambda cfg: time.sleep(0.6) or "ok")
    start = time.monotonic()
    assert client.get("/readyz").status_code == 200
    assert time.monotonic() - start < 1.0  # 0.6 s, not 1.2: both at once

    monkeypatch.setattr(health, "_check_database", lambda cfg: time.sleep(3) or "ok")
    start = time.monotonic()
    resp = client.get("/readyz")
    assert time.monotonic() - start < 2.0
    assert resp.status_code == 503
    assert resp.get_json()["checks"] == {"database": "error: no answer in 1 s", "broker": "ok"}
