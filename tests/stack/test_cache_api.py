"""The result cache end to end on the real stack: `X-Cache`, `Cache-Control`, invalidation.

Searches are cached by the index's own replica and every write there (upsert, delete,
subject erasure) makes them miss at once; deterministic generation and embeddings are
cached by the gateway. The index is one of this module's own (`cache-kb` on MiniLM), so
the writes here disturb no other test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import AUTH, index_doc

from dify_serving.manifests import DesiredState, parse_documents

INDEX = "cache-kb"
DOCS = [
    {"id": "volcano", "text": "Volcanoes erupt molten lava; magma chambers feed them."},
    {"id": "bread", "text": "Sourdough bread rises slowly with wild yeast in a warm kitchen."},
    {
        "id": "alice",
        "text": "Alice keeps her lava lamp collection at 1 Main Street.",
        "subject_id": "alice",
    },
]
QUERY = {"index": INDEX, "query": "lava and magma", "top_k": 5}


@pytest.fixture(scope="module")
def index(stack: Any, base_url: str) -> Iterator[str]:
    state, _ = stack.store.load()
    original = DesiredState(dict(state.models), dict(state.indexes))
    extra = parse_documents([index_doc(INDEX, "minilm", chunking={"maxTokens": 64, "overlap": 8})])
    stack.apply(DesiredState(dict(state.models), {**state.indexes, **extra.indexes}))
    with httpx.Client(base_url=base_url, timeout=120, headers=AUTH) as client:
        deadline = time.monotonic() + 300
        while True:
            r = client.post("/v1/data/upsert", json={"index": INDEX, "documents": DOCS})
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(1)
    try:
        yield INDEX
    finally:
        stack.apply(original)


def search(client: httpx.Client, **headers: str) -> httpx.Response:
    r = client.post("/v1/data/search", json=QUERY, headers=headers)
    assert r.status_code == 200, r.text
    return r


def ids(r: httpx.Response) -> list[str]:
    return [h["document_id"] for h in r.json()["hits"]]


def test_a_search_is_answered_from_the_cache_the_second_time(
    client: httpx.Client, index: str
) -> None:
    fresh = search(client, **{"Cache-Control": "no-cache"})
    first, second = search(client), search(client)
    assert (fresh.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.headers["x-cache"] == "HIT"  # the fresh answer was kept
    assert second.json()["hits"] == fresh.json()["hits"] and ids(second)[0] == "volcano"
    assert second.json()["query_tokens"] == fresh.json()["query_tokens"] > 0
    again = search(client, **{"Cache-Control": "no-cache"})
    assert again.headers["x-cache"] == "MISS" and again.json()["hits"] == fresh.json()["hits"]


def test_an_upsert_makes_cached_searches_miss_and_see_the_new_document(
    client: httpx.Client, index: str
) -> None:
    search(client)
    assert search(client).headers["x-cache"] == "HIT"
    doc = {"id": "etna", "text": "Etna's lava flows and magma plumes in Sicily."}
    r = client.post("/v1/data/upsert", json={"index": index, "documents": [doc]})
    assert r.status_code == 200, r.text
    after = search(client)
    assert after.headers["x-cache"] == "MISS" and "etna" in ids(after)
    assert search(client).headers["x-cache"] == "HIT"


def test_deleting_a_document_makes_cached_searches_miss_without_it(
    client: httpx.Client, index: str
) -> None:
    doc = {"id": "doomed", "text": "Lava tubes and magma vents of a doomed volcano."}
    assert client.post("/v1/data/upsert", json={"index": index, "documents": [doc]}).is_success
    search(client)
    before = search(client)
    assert before.headers["x-cache"] == "HIT" and "doomed" in ids(before)
    r = client.post("/v1/data/delete", json={"index": index, "document_ids": ["doomed"]})
    assert r.status_code == 200, r.text
    after = search(client)
    assert after.headers["x-cache"] == "MISS" and "doomed" not in ids(after)


def test_subject_erasure_is_never_answered_from_the_cache(client: httpx.Client, index: str) -> None:
    search(client)
    before = search(client)
    assert before.headers["x-cache"] == "HIT" and "alice" in ids(before)
    assert any(h["subject_id"] == "alice" for h in before.json()["hits"])
    r = client.post("/v1/data/delete", json={"index": index, "subject_id": "alice"})
    assert r.status_code == 200, r.text
    for _ in range(2):  # not the first answer after, nor the one cached from it
        after = search(client)
        assert "alice" not in ids(after)
        assert all("Alice" not in h["text"] for h in after.json()["hits"])
    assert after.headers["x-cache"] == "HIT"


def test_greedy_generation_is_cached_sampled_is_not(client: httpx.Client) -> None:
    body = {"model": "demo-llm", "prompt": "the cache test says", "max_tokens": 12}

    def infer(**params: Any) -> httpx.Response:
        r = client.post("/v1/inference", json={**body, **params})
        assert r.status_code == 200, r.text
        return r

    first, second = infer(temperature=0), infer(temperature=0)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.json()["output"] == second.json()["output"]
    assert first.json()["usage"] == second.json()["usage"]
    assert first.json()["id"] != second.json()["id"]  # a new request, the same answer
    sampled = [infer(temperature=0.7) for _ in range(2)]
    assert all(r.headers.get("x-cache", "MISS") == "MISS" for r in sampled)
    seeded = [infer(temperature=0.7, seed=11) for _ in range(2)]
    assert [r.headers["x-cache"] for r in seeded] == ["MISS", "HIT"]


def test_embeddings_are_cached(client: httpx.Client) -> None:
    body = {"model": "minilm", "input": ["cached embeddings", "twice"]}
    first = client.post("/v1/embeddings", json=body)
    second = client.post("/v1/embeddings", json=body)
    assert first.status_code == second.status_code == 200, second.text
    assert second.headers["x-cache"] == "HIT"
    assert first.json()["data"] == second.json()["data"]
    again = client.post("/v1/data/embed", json=body)
    assert again.headers["x-cache"] == "HIT"
    assert again.json()["data"] == [d["embedding"] for d in first.json()["data"]]
