"""The result cache's two backends against the same cases: in-process and real Redis.

Redis is `DIFY_MIRROR_REDIS_URL`, else database 15 of the local server; each test uses a
random key prefix and removes its keys. What only the in-process LRU does (eviction by
bytes, an injected clock, threads) is in `tests/unit/test_result_cache.py`.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import redis

from dify_serving.options import CacheOptions
from dify_serving.tasks.cache import LocalCache, RedisCache, ResultCache, open_cache

REDIS_URL = os.environ.get("DIFY_MIRROR_REDIS_URL") or "redis://127.0.0.1:6379/15"


def make(kind: str, prefix: str, ttl_s: float = 60, max_entry: int = 4096) -> ResultCache:
    if kind == "local":
        return LocalCache(max_bytes=max_entry * 4, ttl_s=ttl_s)
    # a generous timeout: a busy machine must not turn a slow answer into a miss
    return RedisCache(REDIS_URL, ttl_s, prefix=prefix, max_entry_bytes=max_entry, timeout_s=2.0)


@pytest.fixture(params=["local", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_value_comes_back_until_replaced(kind: str, prefix: str) -> None:
    cache = make(kind, prefix)

    async def run() -> list[bytes | None]:
        out = [await cache.get("k")]
        await cache.put("k", b"\x00binary\xff")
        out.append(await cache.get("k"))
        await cache.put("k", b"second")
        out += [await cache.get("k"), await cache.get("other")]
        return out

    assert asyncio.run(run()) == [None, b"\x00binary\xff", b"second", None]
    cache.close()


def test_entries_expire_after_their_ttl(kind: str, prefix: str) -> None:
    cache = make(kind, prefix, ttl_s=60)

    async def run() -> tuple[bytes | None, bytes | None, bytes | None]:
        await cache.put("short", b"s", ttl_s=0.3)
        await cache.put("long", b"l")
        present = await cache.get("short")
        deadline = time.monotonic() + 10
        while await cache.get("short") is not None:
            assert time.monotonic() < deadline, "never expired"
            await asyncio.sleep(0.05)
        return present, await cache.get("short"), await cache.get("long")

    assert asyncio.run(run()) == (b"s", None, b"l")
    cache.close()


def test_a_zero_ttl_keeps_nothing_and_a_huge_value_is_not_kept(kind: str, prefix: str) -> None:
    cache = make(kind, prefix, max_entry=4096)

    async def run() -> list[bytes | None]:
        await cache.put("zero", b"v", ttl_s=0)
        await cache.put("huge", b"x" * 5000)
        return [await cache.get("zero"), await cache.get("huge")]

    assert asyncio.run(run()) == [None, None]
    cache.close()


def test_redis_keys_carry_the_prefix_and_their_ttl(prefix: str) -> None:
    cache = make("redis", prefix, ttl_s=120)
    asyncio.run(cache.put("k", b"v"))
    client = redis.Redis.from_url(REDIS_URL)
    assert client.get(prefix + "k") == b"v"
    assert 110_000 < client.pttl(prefix + "k") <= 120_000
    client.close()


def test_gateway_replicas_share_the_redis_cache_across_event_loops(prefix: str) -> None:
    """Two replicas (two caches, each on its own event loop) see each other's answers."""
    one, two = make("redis", prefix), make("redis", prefix)
    asyncio.run(one.put("shared", b"answer"))
    assert asyncio.run(two.get("shared")) == b"answer"
    assert asyncio.run(one.get("shared")) == b"answer"  # a new loop: a new client
    one.close()
    two.close()


def test_open_cache_with_a_url_shares_through_redis(prefix: str) -> None:
    cache = open_cache(CacheOptions(redis=True, ttl_s=30), REDIS_URL)
    assert isinstance(cache, RedisCache)
    cache.prefix = prefix
    asyncio.run(cache.put("k", b"v"))
    assert redis.Redis.from_url(REDIS_URL).get(prefix + "k") == b"v"
    cache.close()
