"""Signing with `standardwebhooks`, and the receiver helper built on it."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook

from segsvc.webhooks.signing import encode_body, new_secret, sign_headers
from segsvc.webhooks.verify import (
    ReplayCache,
    WebhookReplayError,
    WebhookVerificationError,
    verify_webhook,
)

BODY = encode_body({"type": "job.completed", "data": {"id": "x", "status": "succeeded"}})


def signed(keys: list[str], when: datetime | None = None) -> dict[str, str]:
    return sign_headers(msg_id="msg_1", timestamp=when or datetime.now(UTC), body=BODY, keys=keys)


def test_new_secret_has_spec_form() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert 24 <= len(base64.b64decode(secret.removeprefix("whsec_"))) <= 64
    assert new_secret() != secret


def test_sign_headers_verify_with_library() -> None:
    key = new_secret()
    headers = signed([key])
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(key).verify(BODY, headers)["data"]["status"] == "succeeded"


def test_sign_headers_rotation_each_key_verifies() -> None:
    new, old = new_secret(), new_secret()
    headers = signed([new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    for key in (new, old):
        Webhook(key).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_verify_webhook_accepts_then_refuses_replay() -> None:
    key, cache = new_secret(), ReplayCache()
    headers = signed([key])
    event = verify_webhook(headers, BODY.encode(), key, replay_cache=cache)
    assert event["type"] == "job.completed"
    with pytest.raises(WebhookReplayError):
        verify_webhook(headers, BODY.encode(), key, replay_cache=cache)


def test_verify_webhook_retry_with_fresh_timestamp_passes() -> None:
    key, cache = new_secret(), ReplayCache()
    verify_webhook(
        signed([key], datetime.now(UTC) - timedelta(seconds=30)), BODY, key, replay_cache=cache
    )
    verify_webhook(signed([key]), BODY, key, replay_cache=cache)


@pytest.mark.parametrize("skew", [timedelta(minutes=-6), timedelta(minutes=6)])
def test_verify_webhook_refuses_stale_timestamps(skew: timedelta) -> None:
    key = new_secret()
    with pytest.raises(WebhookVerificationError, match="timestamp"):
        verify_webhook(
            signed([key], datetime.now(UTC) + skew), BODY, key, replay_cache=ReplayCache()
        )


def test_verify_webhook_refuses_tampered_body_and_garbage() -> None:
    key, cache = new_secret(), ReplayCache()
    headers = signed([key])
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, BODY.replace("succeeded", "failed"), key, replay_cache=cache)
    with pytest.raises(WebhookVerificationError):
        verify_webhook({**headers, "webhook-signature": "garbage"}, BODY, key, replay_cache=cache)
    with pytest.raises(WebhookVerificationError):
        verify_webhook({}, BODY, key, replay_cache=cache)
    # A refused request does not poison the cache: the genuine one still passes.
    verify_webhook(headers, BODY, key, replay_cache=cache)


@pytest.mark.parametrize("written", ["{}.0", "{}.5", " {}", "+{}", "0{}"])
def test_a_replay_with_the_timestamp_written_another_way_is_refused(written: str) -> None:
    """The library reads webhook-timestamp with float() and signs its integer part, so one
    captured request passed again as "1795774731.0", "+1795774731", ...: a new cache key each."""
    key, cache = new_secret(), ReplayCache()
    headers = signed([key])
    verify_webhook(headers, BODY, key, replay_cache=cache)
    again = {**headers, "webhook-timestamp": written.format(headers["webhook-timestamp"])}
    with pytest.raises(WebhookVerificationError):
        verify_webhook(again, BODY, key, replay_cache=cache)


def test_replay_cache_forgets_expired_keys_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """It rebuilt its whole dict on every add past 10,000 live keys (~5 ms each at 70,000,
    under one lock); now it drops expired keys from the front, and live ones stay."""
    import time as clock

    now = [1000.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    cache = ReplayCache(ttl_s=10)
    for i in range(50_000):
        assert cache.add((f"id{i}", "1"))
    assert not cache.add(("id49999", "1"))  # live: a replay
    now[0] += 11
    assert cache.add(("new", "1"))
    assert len(cache._seen) == 1  # the 50,000 expired ones are gone
    assert cache.add(("id0", "1"))  # and may come again
