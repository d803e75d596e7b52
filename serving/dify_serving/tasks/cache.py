"""The result cache: answers that only their inputs decide, kept for a while by a hash key.

What is cached is decided by the caller and keyed by everything that changes the answer
(`cache_key`): the model and the spec fields an answer depends on (`model_tag`), every
request parameter, the input, and the key's resource scope; a search adds its index's
write version. A changed input is a new key, never an overwritten one, so invalidation
is by key (a new model revision, a new write version) and entries of the old key age out.

Two backends behind one protocol, like the rate limiter's: `LocalCache`, an in-process
LRU bounded in bytes with a TTL per entry (one machine, and the per-index cache of an
index replica); `RedisCache` (`SET key value PX ttl`), shared by every gateway replica
of a cluster. The protocol is async so a Redis round trip never blocks a replica's event
loop; the local cache answers without awaiting anything. A cache is an optimisation:
a Redis error is a miss (logged once per outage, never with the URL), and for a few
seconds afterwards the cache is not asked at all, so an outage costs no request a
timeout. `ttl_s == 0` switches the cache off (`NullCache`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel

from dify_serving.options import CacheOptions
from dify_serving.specs import DifyModelSpec

log = logging.getLogger(__name__)

#: Bytes an entry costs beyond its key and value (dict slot, tuple, object headers).
ENTRY_OVERHEAD = 120
#: An answer over this share of the bound is not kept: it would evict most others.
LARGEST_SHARE = 4
#: Redis keys of the cache start with this.
REDIS_PREFIX = "dm:cache:"
#: Seconds a Redis call may take before it counts as a miss.
REDIS_TIMEOUT_S = 0.25
#: Seconds the cache is not asked after a Redis error.
REDIS_PAUSE_S = 5.0
#: DifyModelSpec fields that place or size a model's replicas, never change an answer.
NOT_IN_ANSWER = frozenset(("replicas", "autoscaling", "resources", "batching", "versions"))


class ResultCache(Protocol):
    """Bytes by key for `ttl_s` seconds; a miss is None. `enabled` is False when off."""

    enabled: bool
    ttl_s: float

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Keep `value` for `ttl_s` seconds (the cache's own TTL when None)."""
        ...

    def close(self) -> None: ...


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cache_key: {type(value).__name__} is not part of a stable key")


def cache_key(kind: str, *parts: Any) -> str:
    """`kind:` and the sha256 of the canonical JSON of `parts` (sorted keys, no spaces).

    Equal inputs give equal keys in every process and every run (no `hash()`, whose
    strings are salted per process); a part that has no canonical JSON is a TypeError,
    never a key that silently varies.
    """
    canonical = json.dumps(
        [kind, *parts], sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain
    )
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{kind}:{digest}"


def model_tag(name: str, spec: DifyModelSpec) -> str:
    """A model's part of a key: its name and every spec field but those that only place
    or size its replicas (`NOT_IN_ANSWER`). A new revision (weights, engine, precision,
    generation defaults) is a new tag, so its old answers miss; a new field of the spec is
    in the tag unless it is listed there."""
    fields = spec.model_dump_json(exclude=set(NOT_IN_ANSWER))
    return cache_key("model", name, fields)


def open_cache(options: CacheOptions, redis_url: str | None = None) -> ResultCache:
    """Redis when the options say so and its URL is known, else in-process; off at TTL 0."""
    if options.ttl_s <= 0:
        return NullCache()
    if options.redis and redis_url:
        return RedisCache(redis_url, options.ttl_s, max_entry_bytes=largest(options.max_bytes))
    return LocalCache(options.max_bytes, options.ttl_s)


def largest(max_bytes: int) -> int:
    """The largest entry a cache bounded by `max_bytes` keeps."""
    return max_bytes // LARGEST_SHARE


class NullCache:
    """The cache switched off (TTL 0): every lookup misses and nothing is kept."""

    enabled = False
    ttl_s = 0.0

    async def get(self, key: str) -> bytes | None:
        return None

    async def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        return None

    def close(self) -> None:
        return None


class LocalCache:
    """In-process LRU bounded in bytes, with a TTL per entry; thread-safe, O(1) per call.

    An expired entry is dropped when it is next looked up, or evicted in LRU order like
    any other; `clear` drops everything at once (an index replica after a write).
    """

    enabled = True

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entry = largest(max_bytes)
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """What the entries cost now, overhead included."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> bytes | None:
        """The value under `key`, or None when absent or expired (synchronous `get`)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            value, expires = entry
            if self._clock() >= expires:
                del self._entries[key]
                self._bytes -= _cost(key, value)
                return None
            self._entries.move_to_end(key)
            return value

    def store(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Keep `value` (synchronous `put`), evicting least recently used entries."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        cost = _cost(key, value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _cost(key, old[0])
            now = self._clock()
            self._drop_expired(now)
            if ttl <= 0 or cost > self.max_entry:
                return
            self._entries[key] = (value, now + ttl)
            self._bytes += cost
            while self._bytes > self.max_bytes:
                evicted, (dropped, _) = self._entries.popitem(last=False)
                self._bytes -= _cost(evicted, dropped)

    def _drop_expired(self, now: float) -> None:
        """Drop expired entries from the least recently used end (where they gather, the
        TTL being one for nearly all): without it an expired entry nobody asks for again
        would hold its memory until eviction, and a cache of new texts only fills."""
        while self._entries:
            key, (value, expires) = next(iter(self._entries.items()))
            if expires > now:
                return
            del self._entries[key]
            self._bytes -= _cost(key, value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        return self.lookup(key)

    async def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.store(key, value, ttl_s)

    def close(self) -> None:
        self.clear()


def _cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


class RedisCache:
    """The cache in Redis, shared by every gateway replica: `SET prefix+key value PX ttl`.

    Redis bounds its own memory (its `maxmemory` policy); entries over `max_entry_bytes`
    are not sent. An error is a miss and pauses the cache for `REDIS_PAUSE_S` (see the
    module docstring); the log names the error's kind, never the URL (it may hold a
    password).
    """

    enabled = True

    def __init__(
        self,
        url: str,
        ttl_s: float,
        *,
        prefix: str = REDIS_PREFIX,
        max_entry_bytes: int = 16 * 1024 * 1024,
        timeout_s: float = REDIS_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.max_entry = max_entry_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self._paused_until = 0.0
        self._failing = False
        # redis.asyncio connections belong to the event loop that opened them
        self._aio: tuple[asyncio.AbstractEventLoop, Any] | None = None

    def _client(self) -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            client = aioredis.Redis.from_url(
                self._url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
                max_connections=64,
            )
            self._aio = (loop, client)
        return self._aio[1]

    def _usable(self) -> bool:
        return not self._failing or self._clock() >= self._paused_until

    def _failed(self, exc: BaseException) -> None:
        if not self._failing:
            log.warning(
                "result cache: Redis failed (%s); answering without the cache, retrying "
                "every %.0f s",
                type(exc).__name__,
                REDIS_PAUSE_S,
            )
        self._failing = True
        self._paused_until = self._clock() + REDIS_PAUSE_S

    def _worked(self) -> None:
        if self._failing:
            log.warning("result cache: Redis answers again")
            self._failing = False

    async def get(self, key: str) -> bytes | None:
        if not self._usable():
            return None
        try:
            value: bytes | None = await self._client().get(self.prefix + key)
        except Exception as exc:  # RedisError, OSError, timeouts: all a miss
            self._failed(exc)
            return None
        self._worked()
        return value

    async def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0 or len(value) > self.max_entry or not self._usable():
            return
        try:
            await self._client().set(self.prefix + key, value, px=max(1, round(ttl * 1000)))
        except Exception as exc:
            self._failed(exc)
            return
        self._worked()

    def close(self) -> None:
        """Forget the client; its connections close with their event loop."""
        self._aio = None

    async def aclose(self) -> None:
        """Close the current event loop's connections."""
        if self._aio is not None:
            await self._aio[1].aclose()
            self._aio = None
