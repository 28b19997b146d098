"""Receiver side: verify a delivery's signature and refuse stale timestamps and replays.

from segsvc.webhooks.verify import verify_webhook, WebhookVerificationError

try:
    event = verify_webhook(request.headers, request.get_data(), "whsec_...")
except WebhookVerificationError:
    return "", 400
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["ReplayCache", "WebhookReplayError", "WebhookVerificationError", "verify_webhook"]

TOLERANCE_S = 5 * 60  # the library refuses timestamps further than this from now


class WebhookReplayError(WebhookVerificationError):
    """This exact signed request was seen before (a replay, not one of our retries)."""


class ReplayCache:
    """Remembers signed (webhook-id, webhook-timestamp) pairs for as long as they could pass."""

    def __init__(self, ttl_s: float = 2 * TOLERANCE_S) -> None:
        self._ttl = ttl_s
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def add(self, key: tuple[str, str]) -> bool:
        """Record `key`; False when it was already there (a replay)."""
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:  # forget expired keys now and then, not every call
                self._seen = {k: t for k, t in self._seen.items() if t > now}
            expires = self._seen.get(key)
            if expires is not None and expires > now:
                return False
            self._seen[key] = now + self._ttl
            return True


_default_cache = ReplayCache()


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str,
    *,
    replay_cache: ReplayCache | None = None,
) -> Any:
    """The parsed event if the signature matches, the timestamp is within 5 min and it is new.

    Raises `WebhookVerificationError` (bad or missing signature, stale timestamp) or its
    subclass `WebhookReplayError`. Retries of one message carry the same `webhook-id` with a
    fresh timestamp and signature, so they pass; deduplicate on `webhook-id` if you must
    process each event once.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        event = Webhook(secret).verify(body, lowered)
    except WebhookVerificationError:
        raise
    except (ValueError, TypeError) as exc:  # malformed signature list or base64
        raise WebhookVerificationError(f"Malformed signature headers: {exc}") from None
    key = (lowered["webhook-id"], lowered["webhook-timestamp"])
    if not (replay_cache or _default_cache).add(key):
        raise WebhookReplayError("This delivery was already received (replay)")
    return event
