"""The embedding engine's queue bounds, in-process on MiniLM (no Ray).

Embeddings over HTTP against the real stack are in `tests/stack/test_embeddings.py`.
"""

from __future__ import annotations

import numpy as np
import pytest


def test_the_engine_queue_is_bounded_by_rows_and_by_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What waits for a compute thread is bounded in rows and in tokens: past either,
    503 at once (in-process). The one compute thread is held busy first, so what is
    queued is known exactly."""
    import asyncio
    import threading

    from tiny_models import minilm_path

    from dify_serving.engines import embeddings
    from dify_serving.engines.protocol import EngineError
    from dify_serving.specs import DifyModelSpec

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = DifyModelSpec(model_id=minilm_path(), task="feature-extraction")
    engine = embeddings.EmbeddingEngine("minilm", spec, minilm_path())
    assert engine.workers == 1
    monkeypatch.setattr(embeddings, "MAX_QUEUED_ROWS", 64)
    monkeypatch.setattr(embeddings, "MAX_QUEUED_TOKENS", 1000)
    release = threading.Event()
    forward = engine._forward

    def held(rows: list[list[int]]) -> np.ndarray:
        release.wait(30)
        return forward(rows)

    engine._forward = held  # type: ignore[method-assign]

    async def refused(rows: list[list[int]]) -> EngineError:
        with pytest.raises(EngineError) as info:
            await engine.submit(rows, sum(map(len, rows)))
        return info.value

    async def scenario() -> tuple[EngineError, EngineError, list[np.ndarray]]:
        short, long = [101, 2023, 102], [101] + [2023] * 98 + [102]  # 3 and 100 tokens
        busy = asyncio.ensure_future(engine.submit([short], 3))  # the thread takes it
        await asyncio.sleep(0)
        assert engine._busy == 1 and engine._queued_rows == 0
        waiting = [asyncio.ensure_future(engine.submit([short] * 48, 144))]
        await asyncio.sleep(0)
        assert (engine._queued_rows, engine._queued_tokens) == (48, 144)
        by_rows = await refused([short] * 17)  # 65 rows > 64
        waiting.append(asyncio.ensure_future(engine.submit([long] * 8, 800)))
        await asyncio.sleep(0)
        assert (engine._queued_rows, engine._queued_tokens) == (56, 944)
        by_tokens = await refused([long])  # 57 rows fit; 1044 tokens do not
        release.set()
        return by_rows, by_tokens, await asyncio.gather(busy, *waiting)

    by_rows, by_tokens, done = asyncio.run(scenario())
    for error in (by_rows, by_tokens):
        assert (error.status, error.code) == (503, "overloaded")
    assert "56 texts (944 tokens)" in by_tokens.message
    assert [len(vectors) for vectors in done] == [1, 48, 8]
    assert (engine._queued_rows, engine._queued_tokens) == (0, 0)
