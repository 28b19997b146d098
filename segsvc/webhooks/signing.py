"""Standard Webhooks signing: `whsec_` secrets and `webhook-*` headers, via `standardwebhooks`."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"  # noqa: S105 - the spec's prefix, not a secret
SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh signing secret in the spec's `whsec_<base64>` form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def encode_body(payload: dict[str, Any]) -> str:
    """The exact body that is signed and sent (compact, ASCII-only JSON)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=False)


def sign_headers(
    *, msg_id: str, timestamp: datetime, body: str, keys: Sequence[str]
) -> dict[str, str]:
    """The three `webhook-*` headers; each key signs, so a rotated-out key still verifies."""
    if not keys:
        raise ValueError("at least one signing secret is needed")
    signatures = [Webhook(key).sign(msg_id=msg_id, timestamp=timestamp, data=body) for key in keys]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
