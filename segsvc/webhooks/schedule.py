"""When to try a message again: a Standard-Webhooks-like schedule with jitter and Retry-After."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

JITTER = 0.2  # +-10% spreads retries of many messages that failed together


def parse_schedule(raw: str) -> tuple[float, ...]:
    """Delays in seconds before attempt 1, 2, ... (the last one repeats)."""
    delays = tuple(float(part) for part in raw.split(",") if part.strip())
    if not delays or any(d < 0 for d in delays):
        raise ValueError(f"a webhook schedule needs non-negative delays, got {raw!r}")
    return delays


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²" and other digits
        return float(value)  # any size: `next_attempt_at` gives up past the max age
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def next_delay(
    *,
    attempts_made: int,
    schedule: tuple[float, ...],
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the next attempt after `attempts_made` attempts have failed."""
    base = schedule[min(attempts_made, len(schedule) - 1)]
    jittered = base * (1 + JITTER * ((rng or random).random() - 0.5)) if base > 0 else 0.0
    return max(jittered, retry_after or 0.0)


def next_attempt_at(
    *,
    now: datetime,
    created_at: datetime,
    attempts_made: int,
    schedule: tuple[float, ...],
    max_age_seconds: float,
    retry_after: float | None = None,
) -> datetime | None:
    """When to try again, or None once the next try would fall past the message's max age."""
    delay = next_delay(attempts_made=attempts_made, schedule=schedule, retry_after=retry_after)
    if delay > max_age_seconds:  # past the max age whenever the message was made (and a
        return None  # Retry-After of 10**12 s would overflow a datetime)
    when = now + timedelta(seconds=delay)
    if when > created_at + timedelta(seconds=max_age_seconds):
        return None
    return when
