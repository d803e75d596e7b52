"""The result cache without Redis or Ray: the in-process LRU, keys, and the gateway's use.

`LocalCache` by bytes and TTL (an injected clock), the switched-off cache, stable keys and
what changes them (a model's new revision does, its replica count does not); then the
gateway in-process with a stand-in model replica: greedy and seeded generation and
embeddings come from the cache with `X-Cache`, sampled ones never do, `Cache-Control`
is obeyed, and keys of different reach do not share entries. The same cases against real
Redis are `tests/services/test_result_cache_redis.py`; searches and invalidation by
writes on the real stack are `tests/stack/test_cache_api.py`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gateways import close_all, gateway, new_key, seed_support_and_other
from support import AUTH

from dify_serving.engines.protocol import Embeddings, Generation, GenerationRequest
from dify_serving.gateway import cache_header
from dify_serving.gateway.dataplane import inference as plane
from dify_serving.gateway.state import GatewayState
from dify_serving.manifests import parse_documents
from dify_serving.options import CacheOptions, GatewayOptions, SecurityOptions
from dify_serving.specs import DifyModel
from dify_serving.tasks.cache import (
    ENTRY_OVERHEAD,
    LocalCache,
    NullCache,
    RedisCache,
    cache_key,
    model_tag,
    open_cache,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


# ---- LocalCache ------------------------------------------------------------------------------


def test_the_least_recently_used_entries_go_when_the_bytes_are_spent() -> None:
    value = b"x" * 1000
    cache = LocalCache(max_bytes=4 * cost("k1", value), ttl_s=60)
    for key in ("k1", "k2", "k3", "k4"):
        cache.store(key, value)
    assert len(cache) == 4 and cache.size_bytes == 4 * cost("k1", value)
    assert cache.lookup("k1") == value  # k1 is now the most recently used
    cache.store("k5", value)
    assert cache.lookup("k2") is None  # the least recently used went
    assert [cache.lookup(k) for k in ("k1", "k3", "k4", "k5")] == [value] * 4
    cache.store("k3", b"small")  # replaced: its bytes are counted once
    assert cache.size_bytes == 3 * cost("k1", value) + cost("k3", b"small")
    cache.store("k6", value)
    cache.store("k7", value)  # k4 went (k3 was stored after it); the small k3 stays
    assert cache.lookup("k4") is None and cache.lookup("k3") == b"small"
    assert cache.size_bytes <= cache.max_bytes


def test_an_entry_over_a_quarter_of_the_bound_is_not_kept_and_drops_the_stale_one() -> None:
    cache = LocalCache(max_bytes=4000, ttl_s=60)
    cache.store("k", b"small")
    cache.store("k", b"z" * 1000)  # over 4000 // 4 with its key and overhead
    assert cache.lookup("k") is None and cache.size_bytes == 0


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache = LocalCache(max_bytes=10_000, ttl_s=300, clock=clock)
    cache.store("default", b"a")
    cache.store("short", b"b", ttl_s=10)
    clock.now += 9.9
    assert cache.lookup("short") == b"b"
    clock.now += 0.1
    assert cache.lookup("short") is None
    assert cache.lookup("default") == b"a"
    clock.now += 290
    assert cache.lookup("default") is None
    assert len(cache) == 0 and cache.size_bytes == 0


def test_expired_entries_nobody_asks_for_again_free_their_memory() -> None:
    """New texts only (a soak, a crawl): entries past their TTL go at the next store,
    not at eviction once the cache is full."""
    clock = Clock()
    cache = LocalCache(max_bytes=1_000_000, ttl_s=60, clock=clock)
    for i in range(100):
        cache.store(f"old{i}", b"x" * 100)
        clock.now += 0.1
    held = cache.size_bytes
    clock.now += 60  # all 100 expired, none looked up again
    cache.store("new", b"y" * 100)
    assert held > 100 * 100 and len(cache) == 1 and cache.size_bytes == cost("new", b"y" * 100)
    assert cache.lookup("new") == b"y" * 100


def test_a_ttl_of_zero_switches_the_cache_off() -> None:
    off = open_cache(CacheOptions(ttl_s=0))
    assert isinstance(off, NullCache) and not off.enabled
    asyncio.run(off.put("k", b"v"))
    assert asyncio.run(off.get("k")) is None
    local = LocalCache(max_bytes=10_000, ttl_s=60)
    local.store("k", b"v", ttl_s=0)
    assert local.lookup("k") is None


def test_open_cache_uses_redis_only_when_told_to_and_given_its_url() -> None:
    url = "redis://127.0.0.1:6379/15"
    assert isinstance(open_cache(CacheOptions(redis=True), url), RedisCache)
    assert isinstance(open_cache(CacheOptions(redis=True), None), LocalCache)
    assert isinstance(open_cache(CacheOptions(redis=False), url), LocalCache)
    assert open_cache(CacheOptions(max_bytes=12345)).max_bytes == 12345  # type: ignore[attr-defined]


def test_the_local_cache_keeps_its_books_under_threads() -> None:
    cache = LocalCache(max_bytes=50_000, ttl_s=60)

    def work(seed: int) -> None:
        for i in range(2000):
            key = f"k{(seed * 7 + i) % 300}"
            if i % 3:
                cache.store(key, bytes(i % 400))
            else:
                cache.lookup(key)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [(k, cache.lookup(k)) for k in [f"k{i}" for i in range(300)]]
    assert cache.size_bytes == sum(cost(k, v) for k, v in held if v is not None)
    assert cache.size_bytes <= cache.max_bytes


def test_the_async_protocol_answers_as_the_sync_calls() -> None:
    cache = LocalCache(max_bytes=10_000, ttl_s=60)

    async def run() -> bytes | None:
        await cache.put("k", b"v")
        return await cache.get("k")

    assert asyncio.run(run()) == b"v"


# ---- keys ------------------------------------------------------------------------------------


def test_keys_are_stable_and_canonical() -> None:
    one = cache_key("search", "kb", 3, {"query": "lava", "top_k": 3, "filter": {"a": 1, "b": 2}})
    two = cache_key("search", "kb", 3, {"filter": {"b": 2, "a": 1}, "top_k": 3, "query": "lava"})
    assert one == two
    # the same in every process and every release: a changed key empties shared caches
    assert one == "search:bcf2b286b119567ecf3e07e720fbaabfa6488e690b63afb43151cdb89333676a"
    assert cache_key("search", "kb", 4, {"query": "lava"}) != cache_key(
        "search", "kb", 3, {"query": "lava"}
    )
    request = GenerationRequest(prompt="hi", max_tokens=8, temperature=0.0)
    same = GenerationRequest(prompt="hi", max_tokens=8, temperature=0.0)
    assert cache_key("generate", request, "-") == cache_key("generate", same, "-")
    for changed in (
        GenerationRequest(prompt="hi!", max_tokens=8, temperature=0.0),
        GenerationRequest(prompt="hi", max_tokens=9, temperature=0.0),
        GenerationRequest(prompt="hi", max_tokens=8, temperature=0.0, seed=1),
        GenerationRequest(prompt="hi", max_tokens=8, temperature=0.0, top_p=0.5),
    ):
        assert cache_key("generate", changed, "-") != cache_key("generate", request, "-")
    assert cache_key("generate", request, "admin") != cache_key("generate", request, "-")
    with pytest.raises(TypeError):
        cache_key("x", object())


def test_the_key_is_the_same_in_another_process() -> None:
    import subprocess
    import sys

    code = (
        "from dify_serving.tasks.cache import cache_key;"
        "print(cache_key('embed', ['a', 'é'], {'y': 1, 'x': [1.5, None]}))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert runs == {cache_key("embed", ["a", "é"], {"x": [1.5, None], "y": 1})}


def model(name: str = "llm", **spec: Any) -> DifyModel:
    doc = {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": name},
        "spec": {"modelId": "builtin:demo-llm", "task": "text-generation", **spec},
    }
    return parse_documents([doc]).models[name]


def test_a_new_revision_of_a_model_is_a_new_tag_its_replica_count_is_not() -> None:
    base = model()
    tag = model_tag("llm", base.spec)
    assert model_tag("llm", model().spec) == tag
    assert model_tag("other", base.spec) != tag
    for changed in (
        {"revision": "v2"},
        {"modelId": "builtin:demo-llm-58m"},
        {"precision": "bf16"},
        {"engine": "torch"},
        {"generation": {"maxNewTokens": 17}},
    ):
        assert model_tag("llm", model(**changed).spec) != tag, changed
    for same in ({"replicas": 3}, {"resources": {"cpus": 2}}, {"batching": {"maxBatchSize": 4}}):
        assert model_tag("llm", model(**same).spec) == tag, same


# ---- Redis unreachable -----------------------------------------------------------------------


def test_an_unreachable_redis_is_a_miss_logged_once_without_its_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = Clock()
    cache = RedisCache(f"redis://:hunter2secret@127.0.0.1:{port}/0", 60, clock=clock)
    tried: list[int] = []
    real = cache._client

    def counting() -> Any:
        tried.append(1)
        return real()

    cache._client = counting  # type: ignore[method-assign]

    async def run() -> list[bytes | None]:
        out = [await cache.get("k")]
        await cache.put("k", b"v")  # paused: not even tried
        out.append(await cache.get("k"))
        clock.now += 10  # the pause is over: tried again, fails again
        out.append(await cache.get("k"))
        return out

    with caplog.at_level(logging.WARNING, logger="dify_serving.tasks.cache"):
        assert asyncio.run(run()) == [None, None, None]
    assert len(tried) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Redis" in warnings[0]
    assert "hunter2secret" not in caplog.text and str(port) not in caplog.text


# ---- the gateway's use -----------------------------------------------------------------------


class StandIn:
    """A model replica that counts its calls: generation text says how it was sampled."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def invoke(self, name: str, method: Any, *args: Any) -> Any:
        self.calls.append(method.__name__)
        if method.__name__ == "generate":
            request = args[0]
            text = f"{name}: {request.prompt or request.messages} #{len(self.calls)}"
            return Generation(text, "length", 3, 5)
        if method.__name__ == "embed_each":
            return [
                Embeddings(
                    np.arange(len(r.texts) * 4, dtype=np.float32).reshape(-1, 4) / 7,
                    2 * len(r.texts),
                )
                for r in args[0]
            ]
        raise AssertionError(method.__name__)


def test_greedy_and_seeded_generation_are_cached_sampled_is_not(tmp_path: Path) -> None:
    state = GatewayState(GatewayOptions(home=str(tmp_path)))
    replicas = StandIn()
    state.model_replicas.invoke = replicas.invoke  # type: ignore[method-assign]
    llm = model()

    def generate(m: DifyModel, **params: Any) -> Generation:
        request = plane.generation_request(m, prompt="hello", **params)
        return asyncio.run(plane.generate(state, m, request))

    first = generate(llm, temperature=0)
    assert generate(llm, temperature=0) == first and replicas.calls == ["generate"]
    seeded = generate(llm, temperature=0.9, seed=7)
    assert generate(llm, temperature=0.9, seed=7) == seeded and len(replicas.calls) == 2
    assert generate(llm, temperature=0.9, seed=8) != seeded and len(replicas.calls) == 3
    sampled = [generate(llm, temperature=0.9) for _ in range(2)]
    assert sampled[0] != sampled[1] and len(replicas.calls) == 5
    # the same name with a new spec (revision) misses; more replicas of the old one do not
    assert generate(model(revision="v2"), temperature=0) != first and len(replicas.calls) == 6
    assert generate(model(replicas=2), temperature=0) == first and len(replicas.calls) == 6
    state.close()


def test_a_task_about_a_data_subject_keeps_nothing_in_the_cache(tmp_path: Path) -> None:
    """The worker runs a task with a `subject_id` inside `subject_use`: an erasure cannot
    find cached answers by subject, so none are made."""
    state = GatewayState(GatewayOptions(home=str(tmp_path)))
    replicas = StandIn()
    state.model_replicas.invoke = replicas.invoke  # type: ignore[method-assign]
    llm = model()

    async def generate(subject: str | None) -> Generation:
        with cache_header.subject_use(subject):
            request = plane.generation_request(llm, prompt="about alice", temperature=0)
            return await plane.generate(state, llm, request)

    asyncio.run(generate("alice"))
    asyncio.run(generate("alice"))
    assert replicas.calls == ["generate", "generate"]  # neither read nor kept
    asyncio.run(generate(None))
    asyncio.run(generate(None))
    assert len(replicas.calls) == 3  # without a subject: kept, then read
    state.close()


def test_embeddings_are_cached_whole_and_come_back_equal(tmp_path: Path) -> None:
    state = GatewayState(GatewayOptions(home=str(tmp_path)))
    replicas = StandIn()
    state.model_replicas.invoke = replicas.invoke  # type: ignore[method-assign]
    embedder = model(
        "emb", modelId="sentence-transformers/all-MiniLM-L6-v2", task="feature-extraction"
    )

    def embed(texts: list[str], truncate: bool = False) -> Embeddings:
        return asyncio.run(plane.embed(state, embedder, texts, truncate))

    first = embed(["a", "b", "c"])
    again = embed(["a", "b", "c"])
    assert replicas.calls == ["embed_each"]
    assert again.prompt_tokens == first.prompt_tokens == 6
    assert again.vectors.dtype == np.float32 and np.array_equal(again.vectors, first.vectors)
    again.vectors[0, 0] = 99  # a cached answer is a copy: writing to it changes nothing
    assert np.array_equal(embed(["a", "b", "c"]).vectors, first.vectors)
    embed(["a", "b"])
    embed(["a", "b", "c"], truncate=True)
    assert len(replicas.calls) == 3
    state.close()


def test_no_cache_at_ttl_zero(tmp_path: Path) -> None:
    state = GatewayState(GatewayOptions(home=str(tmp_path), cache=CacheOptions(ttl_s=0)))
    replicas = StandIn()
    state.model_replicas.invoke = replicas.invoke  # type: ignore[method-assign]
    llm = model()
    for _ in range(2):
        request = plane.generation_request(llm, prompt="hello", temperature=0)
        asyncio.run(plane.generate(state, llm, request))
    assert replicas.calls == ["generate", "generate"]
    state.close()


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    yield seed_support_and_other(tmp_path)
    close_all()


def test_x_cache_and_cache_control_over_http(home: Path) -> None:
    client = gateway(home)
    replicas = StandIn()
    client.app.state.gateway.model_replicas.invoke = replicas.invoke  # type: ignore[attr-defined]
    greedy = {"model": "other-llm", "prompt": "hi", "temperature": 0}

    def post(path: str, body: dict[str, Any], **headers: str) -> Any:
        r = client.post(path, json=body, headers={**AUTH, **headers})
        assert r.status_code == 200, r.text
        return r

    first = post("/v1/inference", greedy)
    second = post("/v1/inference", greedy)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.json()["output"] == second.json()["output"] and len(replicas.calls) == 1
    fresh = post("/v1/inference", greedy, **{"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "MISS" and len(replicas.calls) == 2
    assert fresh.json()["output"] != first.json()["output"]  # the stand-in counts its calls
    assert post("/v1/inference", greedy).json()["output"] == fresh.json()["output"]  # kept
    unkept = {**greedy, "prompt": "not kept"}
    post("/v1/inference", unkept, **{"Cache-Control": "no-store"})
    assert post("/v1/inference", unkept).headers["x-cache"] == "MISS"
    # a request about a data subject is never kept: an erasure leaves nothing behind
    subject = {**greedy, "prompt": "about alice"}
    post("/v1/inference", subject, **{"X-Dify-Subject": "alice"})
    assert post("/v1/inference", subject).headers["x-cache"] == "MISS"
    sampled = {**greedy, "temperature": 0.7}
    assert "x-cache" not in post("/v1/inference", sampled).headers
    completions = {"model": "other-llm", "prompt": "hi", "temperature": 0, "max_tokens": 8}
    assert post("/v1/completions", completions).headers["x-cache"] == "MISS"
    assert post("/v1/completions", completions).headers["x-cache"] == "HIT"
    chat = {"model": "other-llm", "messages": [{"role": "user", "content": "hi"}], "seed": 3}
    assert post("/v1/chat/completions", chat).headers["x-cache"] == "MISS"
    assert post("/v1/chat/completions", chat).headers["x-cache"] == "HIT"
    embed = {"model": "support-embed", "input": ["one", "two"]}
    assert post("/v1/embeddings", embed).headers["x-cache"] == "MISS"
    assert post("/v1/embeddings", embed).headers["x-cache"] == "HIT"
    assert post("/v1/data/embed", embed).headers["x-cache"] == "HIT"  # the same answer
    refused = client.post("/v1/inference", json={**greedy, "max_tokens": 10**6}, headers=AUTH)
    assert refused.status_code == 422 and "x-cache" not in refused.headers


def test_keys_of_different_reach_do_not_share_entries(home: Path) -> None:
    client = gateway(home)
    replicas = StandIn()
    client.app.state.gateway.model_replicas.invoke = replicas.invoke  # type: ignore[attr-defined]
    confined = new_key(client, scopes=["inference"], models=["other-*"])
    twin = new_key(client, scopes=["inference"], models=["other-*"])
    body = {"model": "other-llm", "prompt": "hi", "temperature": 0}
    assert client.post("/v1/inference", json=body, headers=AUTH).headers["x-cache"] == "MISS"
    r = client.post("/v1/inference", json=body, headers=confined["headers"])
    assert r.headers["x-cache"] == "MISS"
    r = client.post("/v1/inference", json=body, headers=twin["headers"])
    assert r.headers["x-cache"] == "HIT"  # the same reach shares
    assert len(replicas.calls) == 2


def test_options_switch_it_off_and_security_off_still_caches(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dify_serving.gateway.app import create_app

    home = seed_support_and_other(tmp_path)
    for ttl, expected in ((300.0, ["MISS", "HIT"]), (0.0, [None, None])):
        options = GatewayOptions(
            home=str(home), security=SecurityOptions(enabled=False), cache=CacheOptions(ttl_s=ttl)
        )
        state = GatewayState(options)
        state.model_replicas.invoke = StandIn().invoke  # type: ignore[method-assign]
        client = TestClient(create_app(state))
        body = {"model": "other-llm", "prompt": "hi", "temperature": 0}
        seen = [client.post("/v1/inference", json=body).headers.get("x-cache") for _ in range(2)]
        assert seen == expected
        state.close()
