"""Embeddings match sentence-transformers and refuse over-long input clearly."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from support import AUTH

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes operators reconcile desired state.",
    "Ray Serve batches requests dynamically.",
    "短い日本語の文です。",
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer
    from tiny_models import minilm_path

    model = SentenceTransformer(minilm_path(), device="cpu")
    return np.asarray(model.encode(TEXTS, normalize_embeddings=True))


def test_http_embeddings_match_sentence_transformers(
    client: httpx.Client, reference: np.ndarray
) -> None:
    r = client.post(
        "/v1/embeddings", json={"model": "minilm", "input": TEXTS, "encoding_format": "float"}
    )
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    cosines = (got * reference).sum(1) / np.linalg.norm(got, axis=1)
    assert cosines.min() >= 0.999, cosines


def test_concurrent_requests_are_batched_correctly(base_url: str, reference: np.ndarray) -> None:
    import concurrent.futures

    def one(i: int) -> tuple[int, list[float]]:
        r = httpx.post(
            f"{base_url}/v1/embeddings",
            json={"model": "minilm", "input": TEXTS[i % len(TEXTS)], "encoding_format": "float"},
            headers=AUTH,
        )
        return i, r.json()["data"][0]["embedding"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    for i, vector in results:
        assert float(np.dot(vector, reference[i % len(TEXTS)])) >= 0.999


def test_over_long_input_names_the_limit(client: httpx.Client) -> None:
    long_text = "token " * 600
    r = client.post("/v1/embeddings", json={"model": "minilm", "input": long_text})
    assert r.status_code == 413
    assert "512" in r.json()["error"]["message"]
    r = client.post(
        "/v1/embeddings", json={"model": "minilm", "input": long_text, "truncate": True}
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 512


def test_empty_input_is_422(client: httpx.Client) -> None:
    for body in ({"model": "minilm", "input": []}, {"model": "minilm", "input": [""]}):
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == 422, r.text


def test_embeddings_from_a_generation_model_is_400(client: httpx.Client) -> None:
    r = client.post("/v1/embeddings", json={"model": "demo-llm", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task"


def test_ten_thousand_inputs_are_refused_up_front_naming_the_limit(client: httpx.Client) -> None:
    r = client.post("/v1/embeddings", json={"model": "minilm", "input": ["word"] * 10_000})
    assert r.status_code == 413, r.text[:300]
    assert "10000" in r.text and "2048" in r.json()["error"]["message"]
    assert "AioRpcError" not in r.text


def test_large_concurrent_requests_fit_the_calls_between_deployments(
    base_url: str, reference: np.ndarray
) -> None:
    """Six requests of 2048 texts at once: coalesced calls stay under gRPC's 4 MiB."""
    import concurrent.futures

    batch = [TEXTS[i % len(TEXTS)] for i in range(2048)]

    def one(_: int) -> httpx.Response:
        return httpx.post(
            f"{base_url}/v1/embeddings",
            json={"model": "minilm", "input": batch},
            headers=AUTH,
            timeout=300,
        )

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, range(6)))
    for r in responses:
        assert r.status_code == 200, r.text[:300]
        got = np.array([d["embedding"] for d in r.json()["data"]])
        expected = reference[[i % len(TEXTS) for i in range(2048)]]
        assert got.shape == (2048, 384) and float((got * expected).sum(1).min()) >= 0.999
