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


def png(color: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
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

    cfg = settings.model_copy(update={"rate_limit_per_minute": 60, "rate_limit_burst": 1})
    check_rate(client_key="refill", settings=cfg)
    with pytest.raises(RateLimitedError):  # the bucket is empty at once...
        check_rate(client_key="refill", settings=cfg)
    time.sleep(1.1)  # ... and 1 token/s puts one back after 1 s
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


def test_a_keyed_retry_of_a_stored_submit_is_not_refused_for_the_rate(
    settings: Settings,
    auth,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 202 of a keyed submit (or batch) was lost and the key's tokens are gone: the retry,
    same key, still gets its jobs (the replay stores nothing), where a new submit gets 429."""
    client = limited_client(settings, rate_limit_per_minute=1, rate_limit_burst=3)

    def keyed(key: str, images: int = 1):  # type: ignore[no-untyped-def]
        path = "/v1/jobs/batch" if images > 1 else "/v1/jobs"
        return client.post(
            path,
            headers={**auth, "Idempotency-Key": key},
            data={"image": [(io.BytesIO(png()), f"{i}.png") for i in range(images)]},
            content_type="multipart/form-data",
        )

    single, batch = keyed("k-single"), keyed("k-batch", images=2)
    assert (single.status_code, batch.status_code) == (202, 202)  # the 3 tokens
    assert submit(client, auth).status_code == 429
    from api.routes import jobs as routes

    decoded: list[int] = []
    real_validate = routes.validate_image
    monkeypatch.setattr(
        routes, "validate_image", lambda *a, **k: decoded.append(1) or real_validate(*a, **k)
    )
    other_body = client.post(  # over the rate, under a stored key: 422, and nothing decoded
        "/v1/jobs",
        headers={**auth, "Idempotency-Key": "k-single"},
        data={"image": (io.BytesIO(png(color=(9, 9, 9))), "0.png")},
        content_type="multipart/form-data",
    )
    assert other_body.status_code == 422
    again = keyed("k-single")
    assert again.status_code == 200
    assert again.get_json()["id"] == single.get_json()["id"]
    batch_again = keyed("k-batch", images=2)
    assert batch_again.status_code == 200
    assert batch_again.headers["Idempotent-Replayed"] == "1"
    assert batch_again.get_json() == batch.get_json()
    assert keyed("k-new").status_code == 429  # a key that stored nothing pays as usual
    assert decoded == []  # replays over the rate are matched by their bytes' hashes only
