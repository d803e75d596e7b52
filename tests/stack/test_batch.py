"""`POST /v1/inference/batch` over real HTTP against the real stack: each item answers as
the same body sent alone to `/v1/inference` would.

Greedy answers and embeddings are cached, and a batch fills the cache: the bodies sent
alone ask for a fresh answer (`Cache-Control: no-cache`), so the engine answers both.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

PROMPTS = [
    "batched: once upon a time",
    "batched: the quick brown fox",
    "batched: serving models needs",
    "batched: hello there",
    "batched: in the beginning",
    "batched: a batch of prompts",
]


def _close(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-4: scores of texts padded in other batches differ in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 1e-4
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return bool(a == b)


def _alone(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/inference", json=body, headers={"Cache-Control": "no-cache"})


def test_a_greedy_batch_answers_as_the_prompts_sent_one_by_one(client: httpx.Client) -> None:
    items = [{"prompt": p, "max_tokens": 12 + i, "temperature": 0} for i, p in enumerate(PROMPTS)]
    r = client.post("/v1/inference/batch", json={"model": "demo-llm", "requests": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "demo-llm" and body["id"] == r.headers["x-request-id"]
    alone = []
    for item in items:
        single = _alone(client, {"model": "demo-llm", **item})
        assert single.status_code == 200, single.text
        alone.append(single.json())
    results = body["results"]
    assert [x["index"] for x in results] == list(range(len(items)))
    assert all(x["status"] == "ok" for x in results), results
    assert [x["output"] for x in results] == [a["output"] for a in alone]
    assert [x["usage"] for x in results] == [a["usage"] for a in alone]
    assert [x["finish_reason"] for x in results] == [a["finish_reason"] for a in alone]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert body["usage"][field] == sum(a["usage"][field] for a in alone)


def test_an_embeddings_batch_answers_the_vectors_of_each_input(client: httpx.Client) -> None:
    items: list[dict[str, Any]] = [
        {"input": PROMPTS[:3]},
        {"input": PROMPTS[3]},
        {"input": PROMPTS[4:]},
    ]
    r = client.post("/v1/inference/batch", json={"model": "minilm", "requests": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert all(x["status"] == "ok" for x in results), results
    assert np.asarray(results[0]["output"]).shape == (3, 384)
    assert np.asarray(results[1]["output"]).shape == (384,)
    tokens = 0
    for item, result in zip(items, results, strict=True):
        single = _alone(client, {"model": "minilm", **item})
        assert single.status_code == 200, single.text
        expected = np.asarray(single.json()["output"])
        assert np.allclose(np.asarray(result["output"]), expected, atol=1e-5)
        tokens += single.json()["usage"]["prompt_tokens"]
    assert r.json()["usage"]["prompt_tokens"] == tokens


def test_one_bad_item_among_good_ones_fails_alone(client: httpx.Client) -> None:
    too_long = " ".join(["word"] * 2000)  # over the model's 256-token context
    bad: list[dict[str, Any]] = [
        {"prompt": "fine", "max_tokens": 65},  # over demo-llm's maxNewTokens (64)
        {"input": "no prompt"},
        {"prompt": too_long, "max_tokens": 4},
    ]
    good = {"prompt": "hello there", "max_tokens": 8, "temperature": 0}
    items = [good, *bad, good]
    r = client.post("/v1/inference/batch", json={"model": "demo-llm", "requests": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["ok", "error", "error", "error", "ok"]
    assert results[0]["output"] == results[4]["output"]
    for item, result in zip(bad, results[1:4], strict=True):
        single = _alone(client, {"model": "demo-llm", **item})
        assert single.status_code in (413, 422), single.text
        error = single.json()["error"]
        assert result["error"] == {"code": error["code"], "message": error["message"]}


def test_a_classifier_batch_and_the_bounds(client: httpx.Client) -> None:
    items: list[dict[str, Any]] = [
        {"input": "I love it"},
        {"input": ["awful", "great"], "top_k": 2},
    ]
    r = client.post("/v1/inference/batch", json={"model": "sentiment", "requests": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for item, result in zip(items, results, strict=True):
        single = _alone(client, {"model": "sentiment", **item})
        assert single.status_code == 200, single.text
        assert _close(result["output"], single.json()["output"])
    over = [{"prompt": "x"}] * 65  # the stack's default limit is 64
    r = client.post("/v1/inference/batch", json={"model": "demo-llm", "requests": over})
    assert r.status_code == 413 and "the limit is 64" in r.json()["error"]["message"]
    r = client.post("/v1/inference/batch", json={"model": "demo-llm", "requests": []})
    assert r.status_code == 422, r.text
    r = client.post("/v1/inference/batch", json={"model": "broken", "requests": [{"prompt": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed", r.text
