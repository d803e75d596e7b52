"""Knowledge benchmarks: search over 100,000 real MiniLM chunks, and ingest.

The corpus is text the benchmark writes (topic sentences from a fixed vocabulary, so the
vectors cluster the way real documents do), embedded once with MiniLM and cached under
`~/.cache/dify-mirror-bench`. The index's shard is built from those vectors with the
platform's own store code before the stack starts, so the search figures measure search;
ingest is measured separately, through `/v1/data/upsert`, against the embedding rate alone.

- search: p50/p99 and QPS at concurrency 8 through `POST /v1/data/search`, by query text
  (embedding included) and by query vector; recall@10 against exact brute force.
- anchor: the same query vectors through qdrant-client's local mode over the same 100k.
- ingest: documents/s through `/v1/data/upsert` (clean, chunk, embed, store) against the
  same chunks through `/v1/data/embed` (embedding alone), same concurrency.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import load

N_CHUNKS = 100_000
CHUNKS_PER_DOC = 10
N_QUERIES = 400
CONCURRENCY = 8
CACHE = Path.home() / ".cache" / "dify-mirror-bench"

_TOPICS = [
    ("harbour", "cranes containers ships quay tides pilots cargo berth freight dock"),
    ("bakery", "flour yeast dough oven crust starter loaf knead proof butter"),
    ("astronomy", "stars galaxies telescope orbit planets nebula comet eclipse light-year"),
    ("medicine", "patients doctors diagnosis therapy dose symptoms clinic surgery vaccine"),
    ("finance", "markets bonds interest inflation equity dividends credit ledger audit"),
    ("gardening", "soil seeds compost roses pruning watering seedlings mulch harvest"),
    ("railways", "trains tracks signals stations timetable locomotive freight sleeper"),
    ("music", "melody chords rhythm orchestra violin tempo harmony concert score"),
    ("law", "court judge contract appeal statute evidence verdict counsel tort"),
    ("cooking", "recipe simmer spices saute broth knife pan seasoning roast"),
    ("software", "compiler tests deploy kernel threads memory cache latency release"),
    ("climate", "emissions carbon glaciers warming rainfall drought storms ocean heat"),
]
_GLUE = "the a of with and in on for about near during after before under".split()


def chunk_text(i: int) -> str:
    rng = random.Random(i)
    topic, words = _TOPICS[(i // CHUNKS_PER_DOC) % len(_TOPICS)]
    vocab = words.split()
    other = _TOPICS[rng.randrange(len(_TOPICS))][1].split()
    parts = [f"Note {i} on {topic}:"]
    for _ in range(rng.randint(10, 22)):
        pool = vocab if rng.random() < 0.7 else other
        parts.append(rng.choice(pool) if rng.random() < 0.75 else rng.choice(_GLUE))
    return " ".join(parts) + "."


def query_text(i: int) -> str:
    rng = random.Random(10_000_000 + i)
    topic, words = _TOPICS[rng.randrange(len(_TOPICS))]
    vocab = words.split()
    return f"{topic}: " + " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 7)))


def _encode(texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from dify_serving.engines.weights import packaged_path

    model = SentenceTransformer(str(packaged_path("all-MiniLM-L6-v2")), device="cpu")
    out = model.encode(texts, batch_size=128, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)


def corpus_vectors() -> np.ndarray:
    """The 100k chunk vectors: MiniLM embeddings of the generated texts (cached)."""
    key = hashlib.sha256("\n".join(chunk_text(i) for i in range(50)).encode()).hexdigest()[:12]
    path = CACHE / f"corpus-{N_CHUNKS}-{key}.npy"
    if path.exists():
        return np.load(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"embedding the {N_CHUNKS} corpus chunks once (cached in {CACHE})", flush=True)
    t0 = time.perf_counter()
    vectors = _encode([chunk_text(i) for i in range(N_CHUNKS)])
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    np.save(path, vectors)
    return vectors


def index_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyIndex",
        "metadata": {"name": name},
        "spec": {"embeddingModel": "minilm", **spec},
    }


def build_shard(home: Path, doc: dict[str, Any], vectors: np.ndarray) -> float:
    """Write the corpus into the index's embedded shard with the platform's store code."""
    from dify_serving.knowledge.backends import open_backend
    from dify_serving.knowledge.points import ChunkPoint, point_id
    from dify_serving.specs import DifyIndexSpec

    index, spec = doc["metadata"]["name"], DifyIndexSpec.model_validate(doc["spec"])
    store = open_backend(index, spec, home)
    store.ensure(vectors.shape[1])
    t0 = time.perf_counter()
    for start in range(0, len(vectors), 100 * CHUNKS_PER_DOC):
        docs = []
        for d in range(start // CHUNKS_PER_DOC, (start // CHUNKS_PER_DOC) + 100):
            points = []
            for c in range(CHUNKS_PER_DOC):
                i = d * CHUNKS_PER_DOC + c
                payload = {
                    "document_id": f"d{d}",
                    "chunk_index": c,
                    "text": chunk_text(i),
                    "start": 0,
                    "end": 0,
                    "subject_id": None,
                    "metadata": {"topic": _TOPICS[d % len(_TOPICS)][0]},
                    "version": "bench",
                }
                points.append(ChunkPoint(point_id(index, f"d{d}", c), vectors[i], payload))
            docs.append((f"d{d}", points))
        store.upsert_many(docs)
    store.optimize()
    seconds = time.perf_counter() - t0
    store.close()
    return seconds


def exact_top10(vectors: np.ndarray, queries: np.ndarray) -> list[set[int]]:
    scores = queries @ vectors.T
    top = np.argpartition(-scores, 10, axis=1)[:, :10]
    return [set(row.tolist()) for row in top]


def qdrant_local_anchor(vectors: np.ndarray, queries: np.ndarray) -> tuple[float, float]:
    """qdrant-client local mode over the same vectors: (QPS, p50 seconds), one caller."""
    import warnings

    from qdrant_client import QdrantClient, models

    warnings.filterwarnings("ignore", message="Local mode is not recommended")
    client = QdrantClient(location=":memory:")
    client.create_collection(
        "bench", vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE)
    )
    for start in range(0, len(vectors), 5000):
        part = vectors[start : start + 5000]
        client.upsert(
            "bench",
            points=models.Batch(ids=list(range(start, start + len(part))), vectors=part.tolist()),
        )
    sample = queries[:40]
    latencies = []
    t0 = time.perf_counter()
    for q in sample:
        t = time.perf_counter()
        client.query_points("bench", query=q.tolist(), limit=10, with_payload=True)
        latencies.append(time.perf_counter() - t)
    qps = len(sample) / (time.perf_counter() - t0)
    client.close()
    return qps, statistics.median(latencies)


def http_search(
    base: str, index: str, bodies: list[dict[str, Any]], concurrency: int
) -> load.Result:
    def body(i: int) -> dict[str, Any]:
        return {"index": index, **bodies[i]}

    asyncio.run(load.run(base, "/v1/data/search", body, 32, concurrency))  # warm
    result = asyncio.run(
        load.run(base, "/v1/data/search", body, len(bodies), concurrency, keep_bodies=True)
    )
    assert result.errors == 0, result.bodies[:1]
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def search_rows(base: str, index: str, vectors: np.ndarray) -> list[tuple[str, str, str, str]]:
    texts = [query_text(i) for i in range(N_QUERIES)]
    queries = _encode(texts)
    truth = exact_top10(vectors, queries)
    by_vector = [{"vector": q.tolist(), "top_k": 10} for q in queries]
    by_text = [{"query": t, "top_k": 10} for t in texts]
    loaded = http_search(base, index, by_vector, CONCURRENCY)
    found = [
        {int(h["document_id"][1:]) * CHUNKS_PER_DOC + h["chunk_index"] for h in hits}
        for hits in (json.loads(b)["hits"] for b in loaded.bodies)
    ]
    recall = float(np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)]))
    print("search: qdrant-client local mode anchor", flush=True)
    local_qps, local_p50 = qdrant_local_anchor(vectors, queries)
    rows = []
    for label, bodies in (("by vector", by_vector), ("by text, embedding included", by_text)):
        one = http_search(base, index, bodies[:200], 1)
        busy = loaded if label == "by vector" else http_search(base, index, bodies, CONCURRENCY)
        qps = busy.requests / busy.seconds
        rows.append(
            (
                f"search 100k chunks {label}: latency alone; QPS at concurrency {CONCURRENCY}",
                f"p50 {percentile(one.latencies, 0.5) * 1000:.1f} ms, "
                f"p99 {percentile(one.latencies, 0.99) * 1000:.1f} ms; {qps:.0f} QPS "
                f"(p99 {percentile(busy.latencies, 0.99) * 1000:.0f} ms under load)",
                f"qdrant-client local mode: p50 {local_p50 * 1000:.0f} ms, {local_qps:.1f} QPS",
                f"{qps / local_qps:.0f}× QPS",
            )
        )
    rows.append(
        (
            "search recall@10, HNSW (m 16, ef 128) over HTTP",
            f"{recall:.3f}",
            "exact brute force (numpy) 1.000",
            f"{recall:.3f}",
        )
    )
    return rows


# ---- ingest ---------------------------------------------------------------------------
def ingest_document(i: int) -> str:
    """About 2,000 tokens in 8 paragraphs: eight 256-token chunks or so."""
    paragraphs = (" ".join(chunk_text(i * 97 + p * 11 + k) for k in range(10)) for p in range(8))
    return "\n\n".join(paragraphs)


def ingest_rows(base: str, index: str, n_docs: int) -> list[tuple[str, str, str, str]]:
    docs = [ingest_document(i) for i in range(n_docs)]

    def upsert_body(i: int) -> dict[str, Any]:
        return {"index": index, "documents": [{"id": f"ing-{i}", "text": docs[i]}]}

    preview = asyncio.run(
        load.run(
            base,
            "/v1/data/clean",
            lambda i: {"text": docs[i], "index": index, "chunk": True},
            n_docs,
            CONCURRENCY,
            keep_bodies=True,
        )
    )
    chunks = [[c["text"] for c in json.loads(b)["chunks"]] for b in preview.bodies]
    flat = [c for doc in chunks for c in doc]
    print(f"ingest: {len(flat)} chunks; sentence-transformers anchor", flush=True)
    _encode(flat[:64])
    t0 = time.perf_counter()
    _encode(flat)
    anchor = n_docs / (time.perf_counter() - t0)
    asyncio.run(load.run(base, "/v1/data/upsert", upsert_body, 8, CONCURRENCY))  # warm
    ingest = asyncio.run(load.run(base, "/v1/data/upsert", upsert_body, n_docs, CONCURRENCY))
    assert ingest.errors == 0
    rate = ingest.requests / ingest.seconds
    return [
        (
            f"ingest documents/s (~2,000 tokens, {len(flat) / n_docs:.1f} chunks each), "
            f"concurrency {CONCURRENCY}",
            f"{rate:.2f} ({rate * len(flat) / n_docs:.0f} chunks/s)",
            f"embedding alone: sentence-transformers encode(batch 128) of the same chunks "
            f"{anchor:.2f} docs/s",
            f"{rate / anchor:.2f}×",
        )
    ]
