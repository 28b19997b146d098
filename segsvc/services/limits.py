"""Submission limits: a Redis token bucket per API key (429) and admission control (503)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from segsvc.errors import RateLimitedError, UnavailableError, ValidationError
from segsvc.models import Job, JobStatus
from segsvc.settings import Settings

log = logging.getLogger(__name__)

QUEUE_FULL_RETRY_AFTER_S = 10

# Refill and take `cost` tokens (one per image) atomically, on Redis' clock so every API process
# agrees. Floats come back as strings: Redis truncates Lua numbers to integers.
BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3] or '1')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""

# Give back `amount` tokens (a request refused after it paid, before it did anything): at most
# up to the bucket's size; a bucket that expired meanwhile is full anyway.
REFUND_SCRIPT = """
local burst = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if tokens then
  redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(burst, tokens + amount)))
end
return 1
"""

_clients: dict[tuple[int, str], Any] = {}


class QueueFullError(UnavailableError):
    code = "queue_full"


def _redis(url: str) -> Any:
    """One client per process and URL, with short timeouts: a limit check must never stall."""
    key = (os.getpid(), url)
    if key not in _clients:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        _clients[key] = (
            client,
            client.register_script(BUCKET_SCRIPT),
            client.register_script(REFUND_SCRIPT),
        )
    return _clients[key]


def check_rate(*, client_key: str, settings: Settings, cost: int = 1) -> None:
    """Take `cost` submission tokens (one per image) for `client_key`; RateLimitedError (429)
    when fewer are left. A cost above the bucket's size could never pass: ValidationError (422).

    Without Redis (the embedded default) or while Redis is down, submissions are not limited:
    accepting work matters more than metering it.
    """
    url = settings.effective_redis_url
    per_minute = settings.rate_limit_per_minute
    if not url or per_minute <= 0:
        return
    burst = max(1, settings.rate_limit_burst)
    if cost > burst:
        raise ValidationError(
            f"{cost} images at once exceed this key's burst of {burst}; send fewer per request."
        )
    _, script, _ = _redis(url)
    try:
        allowed, wait = script(
            keys=[f"segsvc:ratelimit:{client_key}"], args=[per_minute / 60.0, burst, cost]
        )
    except redis.RedisError as exc:
        log.warning("rate limiter unavailable (%s); allowing", exc.__class__.__name__)
        return
    if not int(allowed):
        raise RateLimitedError(
            f"Too many submissions: the limit is {per_minute} per minute for this key.",
            retry_after=max(1.0, float(wait)),
        )


def refund_rate(*, client_key: str, settings: Settings, cost: int = 1) -> None:
    """Give back `cost` tokens `check_rate` took for a request then refused before it did any
    work (a per-key turn's queue full: its client is told to send it again, and must not find
    its retry refused for the rate the refused try paid). Best effort, as the limit is."""
    url = settings.effective_redis_url
    if not url or settings.rate_limit_per_minute <= 0:
        return
    _, _, refund = _redis(url)
    try:
        refund(
            keys=[f"segsvc:ratelimit:{client_key}"],
            args=[max(1, settings.rate_limit_burst), cost],
        )
    except redis.RedisError as exc:
        log.warning("rate limiter unavailable (%s); no refund", exc.__class__.__name__)


# Far from the limit, the backlog is counted at most once per this many seconds per process
# (plus this process's own admissions) instead of on every submit; past half of the limit it is
# counted every time. The limit is a bound for backpressure, not an exact one: submits in flight
# at once each count the backlog before the others commit (up to one batch per request thread
# can pass it), and a process reading its cached count does not see the last second's
# admissions of the others (the backlog can pass half the limit unseen only if the fleet admits
# that many jobs within that second). Exact admission would serialise every submit.
DEPTH_CACHE_SECONDS = 1.0
_depth_cache: dict[int, tuple[float, int]] = {}


def _queue_depth(*, session: Session, limit: int, cost: int) -> int:
    now = time.monotonic()
    hit = _depth_cache.get(limit)
    if hit is not None and hit[0] > now and hit[1] + cost < limit // 2:
        depth = hit[1]
    else:
        # Count at most limit + 1 rows: the check stays cheap however long the backlog is.
        waiting = select(Job.id).where(Job.status == JobStatus.QUEUED).limit(limit + 1)
        depth = int(session.scalar(select(func.count()).select_from(waiting.subquery())) or 0)
        hit = (now + DEPTH_CACHE_SECONDS, depth)
    _depth_cache[limit] = (hit[0], depth + cost)  # the jobs this check admits, if it does
    return depth


def check_admission(*, session: Session, settings: Settings, cost: int = 1) -> None:
    """QueueFullError (503) when `cost` more jobs would take the queued backlog past its limit."""
    limit = settings.max_queue_depth
    if limit <= 0:
        return
    depth = _queue_depth(session=session, limit=limit, cost=cost)
    if depth + cost > limit:
        raise QueueFullError(
            f"The service is at capacity ({depth} jobs waiting); try again shortly.",
            retry_after=QUEUE_FULL_RETRY_AFTER_S,
        )
