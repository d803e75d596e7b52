"""The index deployment in-process, without its replica: searches off the event loop
only where they block, and embedding slices that fail together.

The data API end to end on the real local stack is `tests/stack/test_knowledge_api.py`.
"""

from __future__ import annotations

from typing import Any

import pytest


def _bare_index_server(backend: Any) -> Any:
    """An IndexServer around `backend`, without Ray or a model (search by vector only)."""
    from dify_serving.knowledge.deployment import IndexServer

    server = IndexServer.__new__(IndexServer)
    server.name, server.backend, server.dimension, server.mismatch = "kb", backend, 4, None
    from dify_serving.telemetry import IndexTelemetry

    server.telemetry = IndexTelemetry("kb", lambda: None)  # figures kept, never pushed
    return server


def test_a_search_goes_to_a_thread_only_for_a_qdrant_server(tmp_path: Any) -> None:
    """An Edge shard holds the GIL for its whole call: a thread would free nothing and add
    a hop to every search. A server's round trip releases it: that one is worth a thread."""
    import asyncio
    import threading

    from qdrant_client import QdrantClient

    from dify_serving.knowledge.backends.qdrant_edge import QdrantEdgeBackend
    from dify_serving.knowledge.backends.qdrant_server import QdrantServerBackend
    from dify_serving.specs import DifyIndexSpec

    spec = DifyIndexSpec.model_validate({"embeddingModel": "e"})
    stores = [
        QdrantEdgeBackend(tmp_path / "kb", "kb", spec),
        QdrantServerBackend(QdrantClient(location=":memory:"), "kb", spec),
    ]
    where = {}
    for store in stores:
        store.ensure(4)
        original = store.search

        def recorded(*args: Any, _store: Any = store, _search: Any = original) -> Any:
            where[type(_store).__name__] = threading.current_thread() is threading.main_thread()
            return _search(*args)

        store.search = recorded  # type: ignore[method-assign]
        server = _bare_index_server(store)
        answer = asyncio.run(server.search({"vector": [1.0, 0.0, 0.0, 0.0], "top_k": 3}))
        assert answer["hits"] == []
        store.close()
    assert where == {"QdrantEdgeBackend": True, "QdrantServerBackend": False}


def test_a_failed_embedding_slice_cancels_the_others() -> None:
    """A large document's slices run EMBED_IN_FLIGHT at a time; the first failure ends the
    request, and the slices still running or waiting are cancelled, not left to the model."""
    import asyncio

    from dify_serving.knowledge import deployment

    started: list[int] = []
    cancelled: list[int] = []

    class Method:
        async def remote(self, rows: list[list[int]]) -> Any:
            first = rows[0][0]
            started.append(first)
            try:
                await asyncio.sleep(0 if first == deployment.EMBED_SLICE else 30)
                if first == deployment.EMBED_SLICE:
                    raise RuntimeError("the second slice failed")
            except asyncio.CancelledError:
                cancelled.append(first)
                raise
            return rows

    class Embedder:
        embed_tokens = Method()

    rows = [[i] for i in range(deployment.EMBED_SLICE * 4 * deployment.EMBED_IN_FLIGHT)]

    async def run() -> None:
        with pytest.raises(RuntimeError, match="second slice"):
            await asyncio.wait_for(deployment._sliced(Embedder(), rows), 10)
        await asyncio.sleep(0.1)  # anything left running would show up here
        # checked before asyncio.run ends, which cancels whatever is still running
        # the failure frees one place at the gate before the others are cancelled: one more
        assert len(started) <= deployment.EMBED_IN_FLIGHT + 1 < len(rows) // deployment.EMBED_SLICE
        assert sorted(cancelled) == sorted(set(started) - {deployment.EMBED_SLICE})

    asyncio.run(run())


def test_an_erasure_during_an_upsert_keeps_the_subjects_documents_out() -> None:
    """A bulk ingestion's step embeds, a subject erasure lands meanwhile, then the step
    writes: the erased subject's document is left out (and said so), the others land."""
    import asyncio
    import time
    from types import SimpleNamespace

    from dify_serving.knowledge import deployment

    written: list[str] = []

    class Backend:
        def upsert_many(self, batch: list[tuple[str, list[Any]]]) -> dict[str, int]:
            written.extend(doc_id for doc_id, _ in batch)
            return {}

        def delete_subject(self, subject_id: str) -> int:
            return 0

        def close(self) -> None:
            pass

    server = _bare_index_server(Backend())
    server.spec = SimpleNamespace(store=SimpleNamespace(collection=None))
    server.cache, server._writes, server._erased = None, asyncio.Lock(), {}
    server._last_write, server._optimizer = time.monotonic(), None
    server._schedule_optimize = lambda: None
    chunk = SimpleNamespace(ids=[1, 2], text="t", start=0, end=1)
    server._prepare = lambda docs: [(doc, [chunk]) for doc in docs]
    embedding = asyncio.Event()

    async def embed(rows: list[list[int]]) -> list[list[float]]:
        await embedding.wait()
        return [[0.0] * 4 for _ in rows]

    server._embed = embed
    docs = [
        {"id": "a", "text": "about ada", "subject_id": "ada"},
        {"id": "b", "text": "about bob", "subject_id": "bob"},
    ]

    async def scenario() -> dict[str, Any]:
        step = asyncio.create_task(server.upsert(docs))
        await asyncio.sleep(0.01)  # the step is embedding
        await server.delete(None, "ada")
        embedding.set()
        result: dict[str, Any] = await step
        later = await server.upsert(docs[:1])  # an upsert after the erasure may write her
        assert later["erased"] == []
        return result

    result = asyncio.run(scenario())
    assert result["erased"] == ["a"] and [d["id"] for d in result["documents"]] == ["b"]
    assert written == ["b", "a"]
    assert deployment.ERASED_FOR_S > 300
