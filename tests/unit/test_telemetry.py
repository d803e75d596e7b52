"""Replica figures (`telemetry.py`): the generic wrap of an engine's capability methods,
the engines' hooks, index figures, GPUs through NVML (a fake `pynvml`), and the hub that
gathers every replica into one scrape (its logic here; through Ray in the stack tests).
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as open_latest
from prometheus_client.parser import text_string_to_metric_families

from dify_serving import telemetry
from dify_serving.engines.protocol import (
    Embeddings,
    EmbedRequest,
    EngineError,
    Generation,
    GenerationDelta,
    GenerationRequest,
    PredictionRequest,
)


def value(registry: Any, name: str, **labels: str) -> float | None:
    """A sample's value in `registry` (None when absent)."""
    for family in registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


class FakeGenerator:
    """Answers after `delay` seconds; streams `tokens` deltas `gap` seconds apart."""

    def __init__(self, tokens: int = 5, gap: float = 0.01) -> None:
        self.tokens = tokens
        self.gap = gap
        self.waiting = 0

    async def generate(self, request: GenerationRequest) -> Generation:
        await asyncio.sleep(0.02)
        if request.prompt == "fail":
            raise EngineError(503, "generation_failed", "boom")
        return Generation("hi", "stop", 7, 3)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        await asyncio.sleep(0.05)  # prefill
        for _ in range(self.tokens - 1):
            yield GenerationDelta("x")
            await asyncio.sleep(self.gap)
        yield GenerationDelta("y", "length", 11, self.tokens)

    async def embed_each(self, requests: list[EmbedRequest]) -> list[Embeddings | EngineError]:
        return [
            Embeddings(vectors=None, prompt_tokens=4 * len(r.texts))  # type: ignore[arg-type]
            for r in requests
        ]

    async def embed_tokens(self, rows: list[list[int]]) -> Any:
        return rows

    async def predict(self, request: PredictionRequest) -> list[Any]:
        return [None] * len(request.inputs)


def test_the_wrap_counts_calls_tokens_latency_and_stream_timings() -> None:
    t = telemetry.ModelTelemetry("demo-llm", "v2")
    engine = FakeGenerator(tokens=5, gap=0.01)
    generate = t.wrap("generate", engine.generate)
    stream = t.wrap("generate_stream", engine.generate_stream)
    assert generate.__name__ == "generate"
    import inspect

    assert inspect.isasyncgenfunction(stream)  # Serve streams what an async generator yields

    async def drive() -> list[GenerationDelta]:
        await generate(GenerationRequest(prompt="a"))
        with pytest.raises(EngineError):
            await generate(GenerationRequest(prompt="fail"))
        return [d async for d in stream(GenerationRequest(prompt="b"))]

    deltas = asyncio.run(drive())
    assert len(deltas) == 5 and deltas[-1].finish_reason == "length"
    r = t.registry
    ids = {"model": "demo-llm", "version": "v2"}
    assert value(r, "dify_model_requests_total", method="generate", outcome="ok", **ids) == 1
    assert value(r, "dify_model_requests_total", method="generate", outcome="error", **ids) == 1
    assert value(r, "dify_model_requests_total", method="generate_stream", outcome="ok") == 1
    assert value(r, "dify_model_prompt_tokens_total", **ids) == 7 + 11
    assert value(r, "dify_model_generated_tokens_total", **ids) == 3 + 5
    assert value(r, "dify_model_request_duration_seconds_count", method="generate") == 2
    # time to first token: the 50 ms prefill; per output token: about the 10 ms gaps
    assert value(r, "dify_model_time_to_first_token_seconds_count", **ids) == 1
    ttft = value(r, "dify_model_time_to_first_token_seconds_sum", **ids) or 0
    assert 0.045 < ttft < 0.5
    assert value(r, "dify_model_time_per_output_token_seconds_count", **ids) == 1
    tpot = value(r, "dify_model_time_per_output_token_seconds_sum", **ids) or 0
    assert 0.008 < tpot < 0.1
    assert value(r, "dify_model_time_per_output_token_seconds_bucket", le="0.001") == 0


def test_embeddings_and_predictions_count_inputs_and_tokens() -> None:
    t = telemetry.ModelTelemetry("minilm")
    engine = FakeGenerator()

    async def drive() -> None:
        await t.wrap("embed_each", engine.embed_each)(
            [EmbedRequest(["a", "b"]), EmbedRequest(["c"])]
        )
        await t.wrap("embed_tokens", engine.embed_tokens)([[1, 2, 3], [4, 5]])
        await t.wrap("predict", engine.predict)(PredictionRequest(inputs=["x", "y"]))

    asyncio.run(drive())
    ids = {"model": "minilm", "version": ""}  # no version: an empty label, never missing
    assert value(t.registry, "dify_model_embedding_inputs_total", **ids) == 3 + 2
    assert value(t.registry, "dify_model_embedding_tokens_total", **ids) == 12 + 5
    assert value(t.registry, "dify_model_prediction_inputs_total", **ids) == 2


def test_running_and_waiting_come_from_the_engine_or_the_calls_in_flight() -> None:
    t = telemetry.ModelTelemetry("m")
    gate = asyncio.Event()

    async def slow(request: GenerationRequest) -> Generation:
        await gate.wait()
        return Generation("", "stop", 1, 1)

    wrapped = t.wrap("generate", slow)

    async def drive() -> tuple[float | None, float | None]:
        calls = [asyncio.create_task(wrapped(GenerationRequest(prompt="p"))) for _ in range(3)]
        await asyncio.sleep(0.01)
        seen = (
            value(t.registry, "dify_model_running_requests"),
            value(t.registry, "dify_model_waiting_requests"),
        )
        gate.set()
        await asyncio.gather(*calls)
        return seen

    assert asyncio.run(drive()) == (3.0, 0.0)  # no engine hook: in flight = running
    assert value(t.registry, "dify_model_running_requests") == 0.0
    assert value(t.registry, "dify_model_kv_cache_usage_ratio") is None  # no cache: absent
    t.watch_engine(lambda: {"running": 4, "waiting": 9, "kv_cache_usage": 0.25})
    assert value(t.registry, "dify_model_running_requests") == 4.0
    assert value(t.registry, "dify_model_waiting_requests") == 9.0
    assert value(t.registry, "dify_model_kv_cache_usage_ratio") == 0.25

    def broken() -> dict[str, float]:
        raise RuntimeError("deque mutated during iteration")

    t.watch_engine(broken)  # never fails a push
    assert value(t.registry, "dify_model_waiting_requests") == 0.0
    t.observe_batch(3)
    t.observe_batch(40)
    assert value(t.registry, "dify_model_batch_size_count") == 2
    assert value(t.registry, "dify_model_batch_size_bucket", le="4.0") == 1


def test_ctranslate2_engine_reports_batches_and_its_queue() -> None:
    """The real batching code of the CTranslate2 engine, with a fake generator inside."""
    from dify_serving.engines.ctranslate2_textgen import CTranslate2Engine, _Request

    engine = CTranslate2Engine.__new__(CTranslate2Engine)
    batches: list[int] = []
    engine.on_batch = batches.append  # type: ignore[method-assign]
    engine.workers, engine._busy, engine._running = 1, 0, []
    engine._timer, engine._stopping, engine._seeded, engine.batch_wait_s = None, None, None, 0.0
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    engine._pool = ThreadPoolExecutor(1)
    release = __import__("threading").Event()

    def decode(batch: list[Any]) -> list[list[int]]:
        release.wait(5)
        return [[1] for _ in batch]

    engine._decode = decode  # type: ignore[method-assign]
    engine.eos = {1}

    async def drive() -> dict[str, float] | None:
        loop = asyncio.get_running_loop()
        engine._queue = deque(
            _Request([1], 4, 0.0, 1.0, False, loop, asyncio.Queue(), arrived=loop.time())
            for _ in range(3)
        )
        engine._dispatch()  # one worker: all three in one batch
        engine._queue.extend(
            _Request([1], 4, 0.0, 1.0, False, loop, asyncio.Queue(), arrived=loop.time())
            for _ in range(2)
        )
        seen = engine.queue_state()
        release.set()
        await asyncio.sleep(0.2)
        return seen

    assert asyncio.run(drive()) == {"running": 3, "waiting": 2}
    assert batches[0] == 3
    engine._pool.shutdown()


def test_no_gpu_no_series_and_a_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU path: NVML cannot start (no driver) -> no series at all, not zeros
    class NoDriver(Exception):
        pass

    fake = types.ModuleType("pynvml")

    def no_driver() -> None:
        raise NoDriver("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    text = _text(telemetry.GpuCollector())
    assert "dify_gpu" not in text

    # two GPUs: 37 % and 90 % busy
    memory = {0: (10 * 2**30, 80 * 2**30), 1: (72 * 2**30, 80 * 2**30)}
    util = {0: 37, 1: 90}
    calls: list[str] = []
    fake.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        gpu=util[h], memory=0
    )
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=memory[h][0], total=memory[h][1], free=memory[h][1] - memory[h][0]
    )
    both = telemetry.GpuCollector()
    values = {(s.name, s.labels["gpu"]): s.value for f in both.collect() for s in f.samples}
    assert values[("dify_gpu_utilization_ratio", "0")] == pytest.approx(0.37)
    assert values[("dify_gpu_utilization_ratio", "1")] == pytest.approx(0.90)
    assert values[("dify_gpu_memory_used_bytes", "1")] == 72 * 2**30
    assert values[("dify_gpu_memory_total_bytes", "0")] == 80 * 2**30
    assert calls[-1] == "shutdown"
    # a replica given GPU 1 only reports GPU 1
    mine = telemetry.GpuCollector([1])
    assert {s.labels["gpu"] for f in mine.collect() for s in f.samples} == {"1"}

    # NVML fails mid-read (a GPU fell off the bus): nothing rather than a wrong zero
    def lost(h: int) -> Any:
        raise NoDriver("GPU is lost")

    fake.nvmlDeviceGetUtilizationRates = lost  # type: ignore[attr-defined]
    assert "dify_gpu" not in _text(telemetry.GpuCollector())

    # no pynvml at all
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert "dify_gpu" not in _text(telemetry.GpuCollector())


def test_a_model_replica_off_ray_has_no_gpu_series() -> None:
    t = telemetry.ModelTelemetry("m")
    assert "dify_gpu" not in generate_latest(t.registry).decode()


def _text(collector: Any) -> str:
    return generate_latest(telemetry.Families(list(collector.collect()))).decode()  # type: ignore[arg-type]


def test_index_figures() -> None:
    points = {"n": 5}
    t = telemetry.IndexTelemetry("kb", lambda: points["n"])
    t.searched("HIT", 0.01)
    t.searched("MISS", 0.2)
    t.searched(None, 0.02)
    t.upserts.inc()
    t.upserted_chunks.inc(12)
    r = t.registry
    assert value(r, "dify_index_points", index="kb") == 5
    assert value(r, "dify_index_searches_total", index="kb", cache="hit") == 1
    assert value(r, "dify_index_searches_total", index="kb", cache="miss") == 1
    assert value(r, "dify_index_searches_total", index="kb", cache="off") == 1
    assert value(r, "dify_index_search_duration_seconds_count", index="kb") == 3
    assert value(r, "dify_index_upserted_chunks_total", index="kb") == 12
    points["n"] = None  # type: ignore[assignment]
    assert value(r, "dify_index_points") is None


def test_the_hub_keeps_live_replicas_and_forgets_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    now = {"t": 1000.0}
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: now["t"])
    hub = telemetry.MetricsHub()
    hub.push("gw-a", b"a")
    hub.push("model-b", b"b")
    hub.push("index-c", b"c")
    assert sorted(hub.collect(exclude="gw-a")) == [b"b", b"c"]
    hub.leave("index-c")  # stopped: its series end now
    assert hub.collect() == [b"a", b"b"]
    now["t"] += telemetry.EXPIRE_AFTER_S - 1
    hub.push("gw-a", b"a2")
    now["t"] += 2  # model-b died without leaving: gone after EXPIRE_AFTER_S
    assert hub.collect() == [b"a2"]
    assert hub.replicas() == ["gw-a"]


def test_replicas_merge_into_one_family_each_with_its_own_created() -> None:
    """Two replicas of one model and their replacement: one family per name, a series per
    replica, each with its `_created`; the text parses in both formats."""
    first = telemetry.ModelTelemetry("demo-llm")
    second = telemetry.ModelTelemetry("demo-llm")
    first.generated_tokens.inc(100)
    second.generated_tokens.inc(3)
    pushed = [
        pickle.loads(pickle.dumps(telemetry.relabel(t.registry.collect(), rid)))
        for t, rid in ((first, "r1"), (second, "r2"))
    ]
    merged = telemetry.merge(pushed)
    names = [f.name for f in merged]
    assert len(names) == len(set(names))
    text = generate_latest(telemetry.Families(merged)).decode()  # type: ignore[arg-type]
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    tokens = parsed["dify_model_generated_tokens"]
    by_replica = {s.labels["replica"]: s.value for s in tokens.samples if s.name.endswith("_total")}
    assert by_replica == {"r1": 100.0, "r2": 3.0}
    created = {
        s.labels["replica"]: s.value for s in parsed["dify_model_generated_tokens_created"].samples
    }
    assert set(created) == {"r1", "r2"}
    om = open_latest(telemetry.Families(merged)).decode()  # type: ignore[arg-type]
    assert om.rstrip().endswith("# EOF") and om.count("# TYPE dify_model_generated_tokens ") == 1


def test_the_torch_engine_reads_its_scheduler_and_paged_cache() -> None:
    from dify_serving.engines.textgen import TextGenerationEngine

    engine = TextGenerationEngine.__new__(TextGenerationEngine)
    engine._requests = {"a": None, "b": None}  # type: ignore[dict-item]
    engine.manager = types.SimpleNamespace(batch_processor=None)
    assert engine.queue_state() == {"running": 2, "waiting": 0}  # between runs
    scheduler = types.SimpleNamespace(active_requests={"a": 1}, waiting_requests={"b": 1, "c": 1})
    cache = types.SimpleNamespace(compute_free_capacity=lambda: 0.75)
    engine.manager.batch_processor = types.SimpleNamespace(scheduler=scheduler, cache=cache)
    assert engine.queue_state() == {"running": 1, "waiting": 2, "kv_cache_usage": 0.25}
    engine.manager.batch_processor.cache = None  # transformers moved it: no figure
    assert engine.queue_state() == {"running": 1, "waiting": 2}


def test_a_stream_the_caller_leaves_closes_the_engines_own_stream_at_once() -> None:
    """A cancelled stream must end its sequence in the engine now (its `finally` frees the
    slot), not whenever the abandoned generator is collected."""
    closed: list[bool] = []

    async def engine_stream(request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        try:
            while True:
                yield GenerationDelta("x")
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    t = telemetry.ModelTelemetry("m")

    async def leave_after_one() -> None:
        stream = t.wrap("generate_stream", engine_stream)(GenerationRequest("p"))
        assert (await stream.__anext__()).delta == "x"
        await stream.aclose()  # what Serve does when the caller cancels
        assert closed == [True]

    asyncio.run(leave_after_one())
