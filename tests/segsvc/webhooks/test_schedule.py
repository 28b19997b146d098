"""The retry schedule: growing delays, jitter, Retry-After, the max age."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from segsvc.webhooks.schedule import (
    next_attempt_at,
    next_delay,
    parse_retry_after,
    parse_schedule,
)

DEFAULT = parse_schedule("0,5,300,1800,7200,18000,36000")


def test_next_delay_follows_schedule_with_bounded_jitter() -> None:
    rng = random.Random(1)
    delays = [next_delay(attempts_made=n, schedule=DEFAULT, rng=rng) for n in range(1, 9)]
    for got, want in zip(delays, [5, 300, 1800, 7200, 18000, 36000, 36000, 36000], strict=True):
        assert want * 0.9 <= got <= want * 1.1
    assert delays == sorted(delays[:6]) + delays[6:]
    assert len({round(d, 6) for d in delays[5:]}) == 3  # jittered, not identical


def test_next_delay_honours_longer_retry_after_only() -> None:
    assert next_delay(attempts_made=1, schedule=DEFAULT, retry_after=120) == 120
    assert next_delay(attempts_made=2, schedule=DEFAULT, retry_after=1) >= 270


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("soon", None),
        (None, None),
    ],
)
def test_parse_retry_after_seconds_and_dates(header: str | None, seconds: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == seconds


def test_next_attempt_at_gives_up_past_max_age() -> None:
    created = datetime(2024, 1, 1, tzinfo=UTC)
    soon = next_attempt_at(
        now=created, created_at=created, attempts_made=1, schedule=DEFAULT, max_age_seconds=3600
    )
    assert soon is not None
    assert soon - created <= timedelta(seconds=6)
    late = created + timedelta(minutes=59)
    assert (
        next_attempt_at(
            now=late, created_at=created, attempts_made=2, schedule=DEFAULT, max_age_seconds=3600
        )
        is None
    )


@pytest.mark.parametrize("raw", ["", "1,-2", "a"])
def test_parse_schedule_refuses_bad_values(raw: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        parse_schedule(raw)


@pytest.mark.parametrize("odd", ["²", "١٢٠", "12 0", "-5", "1e3"])
def test_parse_retry_after_ignores_what_is_not_ascii_delta_seconds(odd: str) -> None:
    assert parse_retry_after(odd, now=datetime.now(UTC)) is None


def test_a_retry_after_past_the_max_age_ends_the_message_without_overflowing() -> None:
    now = datetime.now(UTC)
    huge = parse_retry_after("1000000000000", now=now)
    assert huge == 1e12
    when = next_attempt_at(
        now=now,
        created_at=now,
        attempts_made=1,
        schedule=DEFAULT,
        max_age_seconds=3 * 86400,
        retry_after=huge,
    )
    assert when is None  # failed for good, not a crash that leaves it pending for ever
