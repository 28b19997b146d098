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
        # In insertion order, which is expiry order (one TTL for all): the expired ones are
        # always at the front, so forgetting them costs O(1) per key, whatever the load.
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def add(self, key: tuple[str, str]) -> bool:
        """Record `key`; False when it was already there (a replay)."""
        now = time.monotonic()
        with self._lock:
            while self._seen:
                oldest, expires = next(iter(self._seen.items()))
                if expires > now:
                    break
                del self._seen[oldest]
            if key in self._seen:  # every key left is live
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
    # Integer seconds, as the spec and our sender write it: the library reads the header with
    # float(), so "1795774731.0", " +1795774731" or "1_795774731" would verify too, each a new
    # replay-cache key for one captured request.
    stamp = lowered.get("webhook-timestamp", "")
    if not (stamp.isascii() and stamp.isdigit()):
        raise WebhookVerificationError("Malformed webhook-timestamp: integer seconds expected")
    try:
        event = Webhook(secret).verify(body, lowered)
    except WebhookVerificationError:
        raise
    except (ValueError, TypeError) as exc:  # malformed signature list or base64
        raise WebhookVerificationError(f"Malformed signature headers: {exc}") from None
    key = (lowered["webhook-id"], str(int(stamp)))  # "0179..." is the same second
    if not (replay_cache or _default_cache).add(key):
        raise WebhookReplayError("This delivery was already received (replay)")
    return event
