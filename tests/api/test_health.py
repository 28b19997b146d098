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
