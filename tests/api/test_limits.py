"""Per-key token bucket (429 + Retry-After) and admission control (503 + Retry-After)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from sqlalchemy import update

from segsvc.db import session_scope
from segsvc.errors import RateLimitedError
from segsvc.models import Job
from segsvc.services.limits import check_rate
from segsvc.settings import Settings


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def submit(client, auth):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/jobs",
        headers=auth,
        data={"image": (io.BytesIO(png()), "a.png")},
        content_type="multipart/form-data",
    )


def limited_client(settings: Settings, **update_: object):  # type: ignore[no-untyped-def]
    from api.app import create_app

    return create_app(settings.model_copy(update=update_)).test_client()


def test_rate_limit_returns_429_with_retry_after(settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    client = limited_client(settings, rate_limit_per_minute=6, rate_limit_burst=3)
    codes = [submit(client, auth).status_code for _ in range(5)]
    assert codes == [202, 202, 202, 429, 429]
    resp = submit(client, auth)
    assert resp.get_json()["error"] == "rate_limited"
    assert 1 <= int(resp.headers["Retry-After"]) <= 10


def test_rate_limit_is_per_key(settings: Settings, auth, admin_key: str) -> None:  # type: ignore[no-untyped-def]
    client = limited_client(settings, rate_limit_per_minute=6, rate_limit_burst=1)
    assert submit(client, auth).status_code == 202
    assert submit(client, auth).status_code == 429
    assert submit(client, {"Authorization": f"Bearer {admin_key}"}).status_code == 202


def test_rate_limit_refills(settings: Settings) -> None:
    import time

    cfg = settings.model_copy(update={"rate_limit_per_minute": 120, "rate_limit_burst": 1})
    check_rate(client_key="refill", settings=cfg)
    with pytest.raises(RateLimitedError):  # the bucket is empty at once...
        check_rate(client_key="refill", settings=cfg)
    time.sleep(0.6)  # ... and 2 tokens/s put one back after 0.5 s
    check_rate(client_key="refill", settings=cfg)


def test_rate_limit_fails_open_without_redis(settings: Settings) -> None:
    limits = {"rate_limit_per_minute": 1, "rate_limit_burst": 1}
    up = settings.model_copy(update=limits)
    check_rate(client_key="k", settings=up)
    with pytest.raises(RateLimitedError):  # these limits do refuse while Redis answers
        check_rate(client_key="k", settings=up)
    down = settings.model_copy(update={**limits, "redis_url": "redis://127.0.0.1:1/0"})
    for _ in range(3):  # no Redis to meter with: accepted, not refused
        check_rate(client_key="k", settings=down)


def test_queue_full_returns_503_with_retry_after(settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    client = limited_client(settings, max_queue_depth=2)
    assert [submit(client, auth).status_code for _ in range(2)] == [202, 202]
    resp = submit(client, auth)
    assert resp.status_code == 503
    assert resp.get_json()["error"] == "queue_full"
    assert int(resp.headers["Retry-After"]) >= 1
    with session_scope(settings) as session:
        assert session.query(Job).count() == 2
        session.execute(update(Job).values(status="succeeded"))
    assert submit(client, auth).status_code == 202
