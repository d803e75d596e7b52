"""Token-bucket rate limits, in one process or shared by every gateway replica through Redis.

A bucket holds up to `capacity` tokens (the per-minute limit, so a full minute's allowance
may arrive as one burst) and refills continuously at `refill_per_s` (limit / 60). A request
takes `cost` tokens or is refused with the time until it would fit.

Tokens per minute cannot be known before generating, so the gateway `check`s with cost 1
(is anything left?) and `charge`s the completion's tokens afterwards. A charge always
applies and may push the bucket into debt, down to `-capacity`, so a large completion
makes the next requests wait instead of being free.

The Redis limiter runs one Lua script per call (EVALSHA, reloaded on NOSCRIPT), so the
read-refill-take-write cycle is atomic across replicas, and it reads the clock with Redis
`TIME` inside the script: one clock for every replica, no dependence on their skew. Buckets
expire when they would be full again, since an absent bucket means a full one. When Redis
cannot be reached within `timeout_s` the limiter raises `LimiterUnavailable` (the gateway
answers 503), or, with `fail_open`, lets the request through and logs it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one call, with what `RateLimit-*` and `Retry-After` headers need."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    """Seconds until the bucket is full again."""
    retry_after_s: float
    """Seconds until this request would fit (0 when allowed)."""


class LimiterUnavailable(RuntimeError):
    """The shared limiter cannot be reached and the limiter fails closed."""


class Limiter(Protocol):
    def check(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float = 1
    ) -> Decision: ...

    def charge(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float
    ) -> Decision: ...

    async def acheck(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float = 1
    ) -> Decision: ...

    async def acharge(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float
    ) -> Decision: ...


def _validate(capacity: int, refill_per_s: float, cost: float, charging: bool) -> None:
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0, got {capacity}")
    if refill_per_s <= 0:
        raise ValueError(f"refill_per_s must be > 0, got {refill_per_s}")
    if cost < 0 or (not charging and cost > capacity):
        raise ValueError(f"cost must be within [0, capacity={capacity}], got {cost}")


def _decision(
    allowed: bool, tokens: float, capacity: int, refill_per_s: float, cost: float, charging: bool
) -> Decision:
    # A charge is never refused; its retry-after is the wait until a cost-1 check passes.
    need = 1.0 if charging else cost
    waits = charging or not allowed
    return Decision(
        allowed=allowed,
        limit=capacity,
        remaining=max(0, math.floor(tokens)),
        reset_s=max(0.0, (capacity - tokens) / refill_per_s),
        retry_after_s=max(0.0, (need - tokens) / refill_per_s) if waits else 0.0,
    )


class MemoryLimiter:
    """Buckets in a dict behind one lock: exact, O(1) per call, for one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # key -> (tokens, stamp, time the bucket is full again)
        self._buckets: dict[str, tuple[float, float, float]] = {}
        self._lock = threading.Lock()
        self._prune_at = 4096

    def _take(
        self, key: str, capacity: int, refill_per_s: float, cost: float, charging: bool
    ) -> Decision:
        _validate(capacity, refill_per_s, cost, charging)
        with self._lock:
            now = self._clock()
            tokens, stamp, _ = self._buckets.get(key, (float(capacity), now, now))
            tokens = min(float(capacity), tokens + max(0.0, now - stamp) * refill_per_s)
            allowed = True
            if charging:
                tokens = max(-float(capacity), tokens - cost)
            elif tokens >= cost:
                tokens -= cost
            else:
                allowed = False
            self._buckets[key] = (tokens, now, now + (capacity - tokens) / refill_per_s)
            if len(self._buckets) > self._prune_at:
                # A bucket past its full-again time is the same as no bucket.
                self._buckets = {k: v for k, v in self._buckets.items() if v[2] > now}
                self._prune_at = max(4096, 2 * len(self._buckets))
        return _decision(allowed, tokens, capacity, refill_per_s, cost, charging)

    def check(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float = 1
    ) -> Decision:
        """Take `cost` tokens if the bucket holds them."""
        return self._take(bucket_key, capacity, refill_per_s, cost, charging=False)

    def charge(self, bucket_key: str, capacity: int, refill_per_s: float, cost: float) -> Decision:
        """Take `cost` tokens unconditionally, allowing debt down to `-capacity`."""
        return self._take(bucket_key, capacity, refill_per_s, cost, charging=True)

    async def acheck(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float = 1
    ) -> Decision:
        return self.check(bucket_key, capacity, refill_per_s, cost)

    async def acharge(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float
    ) -> Decision:
        return self.charge(bucket_key, capacity, refill_per_s, cost)


# KEYS[1]: the bucket hash. ARGV: capacity, refill per second, cost, "1" to charge.
# Returns {allowed, tokens as a string}: Lua numbers in replies are truncated to integers.
_BUCKET_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = capacity
  stamp = now
end
tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate)
local allowed = 1
if ARGV[4] == '1' then
  tokens = math.max(-capacity, tokens - cost)
elseif tokens >= cost then
  tokens = tokens - cost
else
  allowed = 0
end
local encoded = string.format('%.6f', tokens)
redis.call('HSET', KEYS[1], 'tokens', encoded, 'stamp', string.format('%.6f', now))
local ttl_ms = math.min(math.ceil((capacity - tokens) / rate * 1000), 315360000000)
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.max(1, ttl_ms)))
return {allowed, encoded}
"""


def quick_redis(url: str, timeout_s: float) -> redis.Redis:
    """A client that fails fast: short timeouts, one retry, no backoff (never a hang)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


class RedisLimiter:
    """Buckets in Redis hashes, one atomic script per call, shared by all replicas.

    Needs Redis >= 5, where scripts may call `TIME` (effects replication).
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str = "dify-mirror:",
        fail_open: bool = False,
        timeout_s: float = 0.2,
        max_connections: int = 64,
        pool_timeout_s: float = 1.0,
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.fail_open = fail_open
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.pool_timeout_s = pool_timeout_s
        self._redis = quick_redis(redis_url, timeout_s)
        self._script = self._redis.register_script(_BUCKET_LUA)
        # redis.asyncio connections belong to the event loop that opened them.
        self._aio: tuple[asyncio.AbstractEventLoop, Any, Any] | None = None

    def _async_script(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.redis_url,
                max_connections=self.max_connections,
                # Waiting for a free connection is local queueing, not a slow Redis: it gets
                # its own bound, past which the request is shed like an unreachable Redis.
                timeout=self.pool_timeout_s,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry=AsyncRetry(NoBackoff(), 1),
            )
            client = aioredis.Redis(connection_pool=pool)
            self._aio = (loop, client, client.register_script(_BUCKET_LUA))
        return self._aio[2]

    def _args(
        self, key: str, capacity: int, refill_per_s: float, cost: float, charging: bool
    ) -> tuple[list[str], list[str]]:
        _validate(capacity, refill_per_s, cost, charging)
        args = [
            str(capacity),
            repr(float(refill_per_s)),
            repr(float(cost)),
            "1" if charging else "0",
        ]
        return [self.prefix + key], args

    def _unavailable(self, exc: Exception, capacity: int) -> Decision:
        if not self.fail_open:
            raise LimiterUnavailable(f"rate limiter unreachable: {exc}") from exc
        log.warning("rate limiter unreachable, failing open: %s", exc)
        return Decision(True, capacity, capacity, 0.0, 0.0)

    def _call(
        self, key: str, capacity: int, refill_per_s: float, cost: float, charging: bool
    ) -> Decision:
        keys, args = self._args(key, capacity, refill_per_s, cost, charging)
        try:
            allowed, tokens = self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            return self._unavailable(exc, capacity)
        return _decision(bool(allowed), float(tokens), capacity, refill_per_s, cost, charging)

    async def _acall(
        self, key: str, capacity: int, refill_per_s: float, cost: float, charging: bool
    ) -> Decision:
        keys, args = self._args(key, capacity, refill_per_s, cost, charging)
        try:
            allowed, tokens = await self._async_script()(keys=keys, args=args)
        except redis.RedisError as exc:
            return self._unavailable(exc, capacity)
        return _decision(bool(allowed), float(tokens), capacity, refill_per_s, cost, charging)

    def check(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float = 1
    ) -> Decision:
        """Take `cost` tokens if the bucket holds them."""
        return self._call(bucket_key, capacity, refill_per_s, cost, charging=False)

    def charge(self, bucket_key: str, capacity: int, refill_per_s: float, cost: float) -> Decision:
        """Take `cost` tokens unconditionally, allowing debt down to `-capacity`."""
        return self._call(bucket_key, capacity, refill_per_s, cost, charging=True)

    async def acheck(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float = 1
    ) -> Decision:
        return await self._acall(bucket_key, capacity, refill_per_s, cost, charging=False)

    async def acharge(
        self, bucket_key: str, capacity: int, refill_per_s: float, cost: float
    ) -> Decision:
        return await self._acall(bucket_key, capacity, refill_per_s, cost, charging=True)

    def close(self) -> None:
        self._redis.close()

    async def aclose(self) -> None:
        """Close the connections of the current event loop's client."""
        if self._aio is not None:
            await self._aio[1].aclose()
            self._aio = None


class RouteLimits:
    """Global per-route caps in requests per second, shared by all keys and clients.

    A route's bucket holds `burst_s` seconds' worth of requests, at least one.
    """

    def __init__(
        self, limiter: Limiter, limits: Mapping[str, float], *, burst_s: float = 1.0
    ) -> None:
        for route, rps in limits.items():
            if rps <= 0:
                raise ValueError(f"route {route!r}: requests per second must be > 0, got {rps}")
        self.limiter = limiter
        self.limits = dict(limits)
        self.burst_s = burst_s

    def bucket(self, route: str) -> tuple[str, int, float] | None:
        """(bucket key, capacity, refill per second) for `route`, or None: no cap."""
        rps = self.limits.get(route)
        if rps is None:
            return None
        return f"route:{route}", max(1, math.ceil(rps * self.burst_s)), rps

    def check(self, route: str) -> Decision | None:
        """The decision for one request on `route`, or None when the route has no cap."""
        bucket = self.bucket(route)
        return None if bucket is None else self.limiter.check(*bucket)

    async def acheck(self, route: str) -> Decision | None:
        bucket = self.bucket(route)
        return None if bucket is None else await self.limiter.acheck(*bucket)
