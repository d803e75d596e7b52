"""RFC 6238 time-based one-time codes as a second factor, each code usable once.

A TOTP code stays valid for its 30 s step plus the ±1 step window we accept for clock
drift, so a code seen on the wire could be replayed for up to 90 s. `OtpGuard` closes that:
a matched time-step counter is claimed atomically in a store shared by all gateway
replicas (Redis) or by one process (memory), and a key can never again use a counter at or
below the last one it used.

Six digits are also guessable: with three codes valid at any time, a million tries take
about 330,000 guesses on average. So wrong codes are counted per key in the same store;
`MAX_WRONG_CODES` of them within `WRONG_CODES_WINDOW_S` lock the key's second factor for
`LOCK_S` (every code refused, right or wrong, until then), which leaves an attacker who
holds the key but not the authenticator about 480 guesses a day (Vault's TOTP MFA
allows five attempts by default; pam_faillock locks accounts the same way).

Guesses sent in parallel must not outrun the count: a guess reserves an attempt before
its code is compared, in one atomic step that also refuses while the key is locked, so
at most `MAX_WRONG_CODES` codes are ever being compared or counted in a window however
many arrive at once. A right code gives its attempt back (using the second factor is
not guessing); a wrong one keeps it and is counted, and the one that reaches the limit
sets the lock in the same step. Claiming a counter refuses while the lock exists, so a
right code that raced a locking burst is refused too.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import pyotp
import redis

from dify_serving.security.ratelimit import quick_redis

ISSUER = "dify-mirror"
STEP_S = 30
DIGITS = 6
#: A claimed counter must outlive every window it could still verify in: 3 steps.
CLAIM_TTL_S = 3 * STEP_S

#: Wrong codes a key may send within the window before its second factor is locked.
MAX_WRONG_CODES = 5
WRONG_CODES_WINDOW_S = 300
LOCK_S = 900
#: Retry-After while `MAX_WRONG_CODES` guesses are still being compared (not yet locked).
BUSY_S = 1.0

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


class OtpLocked(Exception):
    """Too many wrong codes: the key's second factor refuses every code for a while."""

    def __init__(self, retry_after_s: float, new: bool) -> None:
        super().__init__(f"second factor locked for {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s
        self.new = new
        """True for the wrong code that caused the lock."""


class ReplayStore(Protocol):
    """Per key: used counters, attempts being compared, wrong codes and the lock.

    Each method is one atomic step and raises `OtpLocked` while the key is locked.
    """

    def reserve(self, key_id: str, attempt: str) -> None:
        """Take one of the key's `MAX_WRONG_CODES` attempts before a code is compared.

        Raises OtpLocked while locked, or (for `BUSY_S`) while every attempt is taken.
        """
        ...

    def wrong(self, key_id: str, attempt: str) -> None:
        """Count `attempt`'s code as wrong; raises OtpLocked (new) when it locks the key."""
        ...

    def claim(self, key_id: str, counter: int, attempt: str) -> bool:
        """Give `attempt` back and record `counter`; False if it or a later one was used."""
        ...


class MemoryReplayStore:
    """The same state for one process (tests, single-replica edge setups), under one lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, tuple[int, float]] = {}
        self._tries: dict[str, dict[str, float]] = {}  # key → attempt → when it was taken
        self._wrong: dict[str, list[float]] = {}  # key → times of recent wrong codes
        self._locked: dict[str, float] = {}  # key → time its lock ends
        self._lock = threading.Lock()
        self._prune_at = 1024

    def _refuse_if_locked(self, key_id: str, now: float) -> None:
        left = self._locked.get(key_id, 0.0) - now
        if left > 0:
            raise OtpLocked(left, new=False)

    def reserve(self, key_id: str, attempt: str) -> None:
        now = self._clock()
        with self._lock:
            self._refuse_if_locked(key_id, now)
            since = now - WRONG_CODES_WINDOW_S
            tries = {a: t for a, t in self._tries.get(key_id, {}).items() if t > since}
            if len(tries) >= MAX_WRONG_CODES:
                raise OtpLocked(BUSY_S, new=False)
            tries[attempt] = now
            self._tries[key_id] = tries

    def wrong(self, key_id: str, attempt: str) -> None:
        now = self._clock()
        with self._lock:
            self._refuse_if_locked(key_id, now)
            recent = [t for t in self._wrong.get(key_id, []) if t > now - WRONG_CODES_WINDOW_S]
            recent.append(now)
            if len(recent) < MAX_WRONG_CODES:
                self._wrong[key_id] = recent
                return
            self._wrong.pop(key_id, None)
            self._tries.pop(key_id, None)
            self._locked[key_id] = now + LOCK_S
            if len(self._locked) > self._prune_at:
                self._locked = {k: v for k, v in self._locked.items() if v > now}
            raise OtpLocked(float(LOCK_S), new=True)

    def claim(self, key_id: str, counter: int, attempt: str) -> bool:
        now = self._clock()
        with self._lock:
            tries = self._tries.get(key_id)
            if tries is not None:
                tries.pop(attempt, None)
            self._refuse_if_locked(key_id, now)
            last = self._last.get(key_id)
            if last is not None and last[1] > now and counter <= last[0]:
                return False
            self._last[key_id] = (counter, now + CLAIM_TTL_S)
            if len(self._last) > self._prune_at:
                self._last = {k: v for k, v in self._last.items() if v[1] > now}
                self._prune_at = max(1024, 2 * len(self._last))
            return True


# Each script is one step of ReplayStore; the lock's PTTL (ms) is returned while it exists.
# KEYS: attempts (sorted set), lock. ARGV: max, window s, attempt. -1: every attempt taken.
_RESERVE_LUA = """
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return left end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 0
"""

# KEYS: wrong-code times (sorted set), lock, attempts. ARGV: max, window s, lock s, attempt.
# Returns {lock ms left, 1 when this code set the lock}.
_WRONG_LUA = """
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {left, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then return {0, 0} end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
return {tonumber(ARGV[3]) * 1000, 1}
"""

# KEYS: the counter, the last counter, lock, attempts. ARGV: counter, ttl s, attempt.
# Returns {1 accepted / 0 used before, lock ms left}.
_CLAIM_LUA = """
redis.call('ZREM', KEYS[4], ARGV[3])
local left = redis.call('PTTL', KEYS[3])
if left > 0 then return {0, left} end
local last = tonumber(redis.call('GET', KEYS[2]))
if last and tonumber(ARGV[1]) <= last then return {0, 0} end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return {0, 0} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return {1, 0}
"""


class RedisReplayStore:
    """The same state shared by every replica: one Lua script per step."""

    def __init__(
        self, redis_url: str, prefix: str = "dify-mirror:", timeout_s: float = 0.2
    ) -> None:
        self.prefix = prefix
        self._redis = quick_redis(redis_url, timeout_s)
        self._reserve_script = self._redis.register_script(_RESERVE_LUA)
        self._wrong_script = self._redis.register_script(_WRONG_LUA)
        self._claim_script = self._redis.register_script(_CLAIM_LUA)

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise OtpUnavailable("the second factor's store is unreachable") from exc

    def reserve(self, key_id: str, attempt: str) -> None:
        base = f"{self.prefix}otp:{key_id}"
        args = [MAX_WRONG_CODES, WRONG_CODES_WINDOW_S, attempt]
        left = int(self._run(self._reserve_script, [f"{base}:tries", f"{base}:lock"], args))
        if left > 0:
            raise OtpLocked(left / 1000, new=False)
        if left == -1:
            raise OtpLocked(BUSY_S, new=False)

    def wrong(self, key_id: str, attempt: str) -> None:
        base = f"{self.prefix}otp:{key_id}"
        keys = [f"{base}:wrong", f"{base}:lock", f"{base}:tries"]
        args = [MAX_WRONG_CODES, WRONG_CODES_WINDOW_S, LOCK_S, attempt]
        left, new = self._run(self._wrong_script, keys, args)
        if int(left) > 0:
            raise OtpLocked(int(left) / 1000, new=bool(new))

    def claim(self, key_id: str, counter: int, attempt: str) -> bool:
        base = f"{self.prefix}otp:{key_id}"
        keys = [f"{base}:{counter}", f"{base}:last", f"{base}:lock", f"{base}:tries"]
        accepted, left = self._run(self._claim_script, keys, [counter, CLAIM_TTL_S, attempt])
        if int(left) > 0:
            raise OtpLocked(int(left) / 1000, new=False)
        return bool(accepted)

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
        """True once per valid code; False for a wrong, stale or replayed code.

        Raises OtpLocked while the key is locked (or its attempts are all being
        compared), and for the wrong code that locks it.
        """
        attempt = uuid.uuid4().hex
        self.store.reserve(key_id, attempt)
        counter = verify(secret, code, now=self._clock(), window=self.window)
        if counter is None:
            self.store.wrong(key_id, attempt)
            return False
        return self.store.claim(key_id, counter, attempt)

    async def acheck(self, key_id: str, secret: str, code: str) -> bool:
        """`check` off the event loop (the Redis store does blocking I/O)."""
        return await asyncio.to_thread(self.check, key_id, secret, code)
