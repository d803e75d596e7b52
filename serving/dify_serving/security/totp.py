"""RFC 6238 time-based one-time codes as a second factor, each code usable once.

A TOTP code stays valid for its 30 s step plus the ±1 step window we accept for clock
drift, so a code seen on the wire could be replayed for up to 90 s. `OtpGuard` closes that:
a matched time-step counter is claimed atomically in a store shared by all gateway
replicas (Redis) or by one process (memory), and a key can never again use a counter at or
below the last one it used.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol

import pyotp
import redis

from dify_serving.security.ratelimit import quick_redis

ISSUER = "dify-mirror"
STEP_S = 30
DIGITS = 6
#: A claimed counter must outlive every window it could still verify in: 3 steps.
CLAIM_TTL_S = 3 * STEP_S

_CODE = re.compile(r"[0-9]{6}")


def new_secret() -> str:
    """A random 160-bit base32 secret, the size RFC 4226 recommends."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, name: str) -> str:
    """The `otpauth://` URI authenticator apps scan as a QR code."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).provisioning_uri(
        name=name, issuer_name=ISSUER
    )


def verify(secret: str, code: str, *, now: float | None = None, window: int = 1) -> int | None:
    """The time-step counter `code` is valid for (within ±`window` steps), else None."""
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        return None
    otp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S)
    current = int((time.time() if now is None else now) // STEP_S)
    matched: int | None = None
    for counter in range(current - window, current + window + 1):
        if hmac.compare_digest(otp.generate_otp(counter), code) and matched is None:
            matched = counter
    return matched


class OtpUnavailable(RuntimeError):
    """The replay store cannot be reached; the second factor must fail closed."""


class ReplayStore(Protocol):
    def claim(self, key_id: str, counter: int) -> bool:
        """Atomically record `counter` for `key_id`; False if it or a later one was used."""
        ...


class MemoryReplayStore:
    """Last accepted counter per key, for one process (tests, single-replica edge setups)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._prune_at = 1024

    def claim(self, key_id: str, counter: int) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(key_id)
            if last is not None and last[1] > now and counter <= last[0]:
                return False
            self._last[key_id] = (counter, now + CLAIM_TTL_S)
            if len(self._last) > self._prune_at:
                self._last = {k: v for k, v in self._last.items() if v[1] > now}
                self._prune_at = max(1024, 2 * len(self._last))
            return True


_CLAIM_LUA = """
local last = tonumber(redis.call('GET', KEYS[2]))
if last and tonumber(ARGV[1]) <= last then return 0 end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
"""


class RedisReplayStore:
    """Claims shared by every replica: `SET NX EX` on the counter plus the last counter."""

    def __init__(
        self, redis_url: str, prefix: str = "dify-mirror:", timeout_s: float = 0.2
    ) -> None:
        self.prefix = prefix
        self._redis = quick_redis(redis_url, timeout_s)
        self._script = self._redis.register_script(_CLAIM_LUA)

    def claim(self, key_id: str, counter: int) -> bool:
        keys = [f"{self.prefix}otp:{key_id}:{counter}", f"{self.prefix}otp:{key_id}:last"]
        try:
            return bool(self._script(keys=keys, args=[counter, CLAIM_TTL_S]))
        except redis.RedisError as exc:
            raise OtpUnavailable(f"OTP replay store unreachable: {exc}") from exc

    def close(self) -> None:
        self._redis.close()


class OtpGuard:
    """Verifies a key's code and accepts each time step at most once."""

    def __init__(
        self,
        store: ReplayStore | None = None,
        *,
        redis_url: str | None = None,
        prefix: str = "dify-mirror:",
        window: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Claims go to `store`, else to Redis at `redis_url`, else to this process."""
        if store is None:
            store = RedisReplayStore(redis_url, prefix) if redis_url else MemoryReplayStore()
        self.store = store
        self.window = window
        self._clock = clock

    def check(self, key_id: str, secret: str, code: str) -> bool:
        """True once per valid code; False for a wrong, stale or replayed code."""
        counter = verify(secret, code, now=self._clock(), window=self.window)
        return counter is not None and self.store.claim(key_id, counter)

    async def acheck(self, key_id: str, secret: str, code: str) -> bool:
        """`check` off the event loop (the Redis store does blocking I/O)."""
        return await asyncio.to_thread(self.check, key_id, secret, code)
