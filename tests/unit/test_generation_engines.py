"""Text generation on OpenVINO GenAI and CTranslate2 against transformers' engine (the
quality guard).

In fp32 each fast engine must give transformers' greedy tokens exactly, in a shared batch
as alone; streaming, per-request max_tokens, end-of-sequence, cancellation and seeded
sampling behave as on the torch engine. The weights are demo-llm's (random, built from a
config): exact token agreement on random weights is a stricter check than on a trained
model, whose logits have wider margins.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dify_serving.engines import (
    base,
    ctranslate2_textgen,
    openvino_textgen,
    progress,
    registry,
    runtimes,
    textgen,
    weights,
)
from dify_serving.engines.ctranslate2_textgen import CTranslate2Engine
from dify_serving.engines.openvino_textgen import OpenVINOGenerationEngine
from dify_serving.engines.protocol import EngineError, Generation, GenerationRequest
from dify_serving.engines.textgen import TextGenerationEngine, TokenGenerator
from dify_serving.engines.weights import build_demo_llm
from dify_serving.specs import DifyModelSpec, Runtime, Task

PROMPTS = [
    "hello",
    "the river runs past the old mill",
    "invoice refund password router kernel vaccine tariff orbit violin harvest mortgage",
    "a",
    "what is the capital of the country with the longest coastline in the world, and why",
    "glacier compiler allergy",
]


def spec(**fields: Any) -> DifyModelSpec:
    return DifyModelSpec.model_validate(
        {"modelId": "builtin:demo-llm", "task": "text-generation", **fields}
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_llm(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


def run(engine: TokenGenerator, work: Any) -> Any:
    """`work(engine)` on a fresh loop, with the engine started (warm) first."""

    async def main() -> Any:
        await engine.start()
        try:
            return await work(engine)
        finally:
            await engine.stop("test over")

    return asyncio.run(main())


async def together(engine: TokenGenerator, requests: list[GenerationRequest]) -> list[Generation]:
    return list(await asyncio.gather(*(engine.generate(r) for r in requests)))


@pytest.fixture(scope="module")
def torch_answers(demo: Path) -> list[Generation]:
    engine = TextGenerationEngine("demo", spec(engine="torch"), str(demo))
    requests = [GenerationRequest(prompt=p, max_tokens=12) for p in PROMPTS]
    return list(run(engine, lambda e: together(e, requests)))


FAST = {"ctranslate2": CTranslate2Engine, "openvino": OpenVINOGenerationEngine}


@pytest.fixture()
def ct2(demo: Path, home: Path) -> CTranslate2Engine:
    return CTranslate2Engine("demo", spec(engine="ctranslate2"), str(demo), home=home)


@pytest.fixture()
def ov(demo: Path, home: Path) -> OpenVINOGenerationEngine:
    return OpenVINOGenerationEngine("demo", spec(engine="openvino"), str(demo), home=home)


@pytest.fixture(params=sorted(FAST))
def fast(request: pytest.FixtureRequest, demo: Path, home: Path) -> TokenGenerator:
    engine: TokenGenerator = FAST[request.param](
        "demo", spec(engine=request.param), str(demo), home=home
    )
    return engine


def test_fp32_greedy_gives_transformers_tokens_in_a_shared_batch(
    fast: TokenGenerator, torch_answers: list[Generation], demo: Path
) -> None:
    info = fast.info()
    assert info["engine"] in FAST and info["precision"] == "fp32"
    assert info["parameters"] == TextGenerationEngine("x", spec(), str(demo)).parameters() > 0
    requests = [GenerationRequest(prompt=p, max_tokens=12) for p in PROMPTS]
    got = run(fast, lambda e: together(e, requests))
    assert got == torch_answers


def test_streaming_per_request_limits_and_end_of_sequence(fast: TokenGenerator) -> None:
    async def work(engine: TokenGenerator) -> Any:
        whole = await engine.generate(GenerationRequest(prompt=PROMPTS[1], max_tokens=10))
        deltas = [
            d
            async for d in engine.generate_stream(
                GenerationRequest(prompt=PROMPTS[1], max_tokens=10)
            )
        ]
        short, long = await together(
            engine,
            [
                GenerationRequest(prompt=PROMPTS[2], max_tokens=3),
                GenerationRequest(prompt=PROMPTS[2], max_tokens=9),
            ],
        )
        # the first greedy token of this prompt made an end-of-sequence id: "stop"
        first = (await engine.generate(GenerationRequest(prompt=PROMPTS[0], max_tokens=1))).text
        engine.eos = engine.eos | set(engine.tokenizer.convert_tokens_to_ids(first.split()[:1]))
        stopped = await engine.generate(GenerationRequest(prompt=PROMPTS[0], max_tokens=8))
        return whole, deltas, short, long, stopped

    whole, deltas, short, long, stopped = run(fast, work)
    assert "".join(d.delta for d in deltas) == whole.text
    last = deltas[-1]
    assert (last.finish_reason, last.completion_tokens) == ("length", 10)
    assert last.prompt_tokens == whole.prompt_tokens > 0
    assert (short.completion_tokens, long.completion_tokens) == (3, 9)
    assert long.text.startswith(short.text)
    assert (stopped.finish_reason, stopped.completion_tokens) == ("stop", 1)


def test_a_caller_that_goes_away_frees_its_row(fast: TokenGenerator) -> None:
    async def work(engine: TokenGenerator) -> Any:
        stream = engine.generate_stream(GenerationRequest(prompt=PROMPTS[4], max_tokens=200))
        other = asyncio.ensure_future(
            engine.generate(GenerationRequest(prompt=PROMPTS[1], max_tokens=6))
        )
        async for _ in stream:
            break
        await stream.aclose()  # what the replica does when the HTTP client disconnects
        done = await other
        for _ in range(100):  # the cancelled row stops at its next token
            if engine.info()["active_requests"] == 0:
                break
            await asyncio.sleep(0.02)
        return done, engine.info()["active_requests"]

    done, active = run(fast, work)
    assert done.completion_tokens == 6 and active == 0


def test_seeded_sampling_is_reproducible_and_matches_torch(
    ct2: CTranslate2Engine, demo: Path
) -> None:
    sampled = GenerationRequest(prompt=PROMPTS[1], max_tokens=10, temperature=0.9, seed=7)

    async def twice(engine: TokenGenerator) -> list[Generation]:
        return [await engine.generate(sampled), await engine.generate(sampled)]

    first, second = run(ct2, twice)
    assert first == second
    assert ct2.info()["engine_note"].startswith("seeded sampling runs on torch")
    torch_engine = TextGenerationEngine("demo", spec(engine="torch"), str(demo))
    assert run(torch_engine, twice)[0] == first
    # unseeded sampling stays on CTranslate2 and honours the limits
    unseeded = GenerationRequest(prompt=PROMPTS[1], max_tokens=5, temperature=0.9, top_p=0.8)
    ct2_again = CTranslate2Engine("demo", spec(), str(demo), home=ct2.home)
    out = run(ct2_again, lambda e: e.generate(unseeded))
    assert out.completion_tokens == 5 and "engine_note" not in ct2_again.info()


def test_seeded_sampling_runs_in_openvino_whatever_its_batch_mates(
    ov: OpenVINOGenerationEngine,
) -> None:
    sampled = GenerationRequest(prompt=PROMPTS[1], max_tokens=10, temperature=0.9, seed=7)
    reseeded = GenerationRequest(prompt=PROMPTS[1], max_tokens=10, temperature=0.9, seed=8)

    async def work(engine: TokenGenerator) -> list[Generation]:
        alone = await engine.generate(sampled)
        mates = [GenerationRequest(prompt=p, max_tokens=16) for p in PROMPTS]
        crowd = await together(engine, [*mates, sampled, reseeded])
        return [alone, *crowd[-2:]]

    alone, in_a_crowd, other = run(ov, work)
    assert alone == in_a_crowd and alone.completion_tokens == 10
    assert other.text != alone.text
    assert "engine_note" not in ov.info()  # nothing went to torch


@pytest.mark.parametrize(
    ("runtime", "module", "folder"),
    [
        ("ctranslate2", ctranslate2_textgen, "ctranslate2"),
        ("openvino", openvino_textgen, "openvino-genai"),
    ],
)
def test_conversion_is_cached_and_a_failed_one_runs_torch_saying_why(
    demo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runtime: str,
    module: Any,
    folder: str,
) -> None:
    def load(name: str) -> None:
        engine = FAST[runtime](name, spec(engine=runtime), str(demo), home=tmp_path)
        asyncio.run(engine.stop("test over"))

    load("a")
    folders = list((tmp_path / "compiled" / folder).iterdir())
    assert len(folders) == 1 and (folders[0] / module.MODEL_FILE).is_file()
    assert not [p for p in folders[0].parent.iterdir() if p.name.startswith(".")]

    def broken(*_: Any) -> None:
        raise RuntimeError("unsupported architecture")

    monkeypatch.setattr(module, "convert", broken)
    load("b")  # cached: no conversion
    monkeypatch.setattr(weights, "resolve", lambda *_a, **_k: str(demo))
    engine = registry.load_engine("c", spec(engine=runtime), tmp_path / "other")
    info = engine.info()
    assert isinstance(engine, TextGenerationEngine) and info["engine"] == "torch"
    assert info["engine_note"] == f"{runtime} conversion failed (RuntimeError); running torch"


def test_auto_picks_by_task_device_and_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtimes.resolve(spec()) == Runtime.OPENVINO
    assert runtimes.resolve(spec(precision="int8")) == Runtime.CTRANSLATE2  # checks agreement
    monkeypatch.setattr(base, "cpu_has_bf16", lambda: True)
    assert runtimes.resolve(spec(precision="bf16")) == Runtime.OPENVINO
    monkeypatch.setattr(base, "cpu_has_bf16", lambda: False)  # bf16 would be emulated
    assert runtimes.resolve(spec(precision="bf16")) == Runtime.OPENVINO  # in fp32
    generation = (Runtime.OPENVINO, Task.TEXT_GENERATION)
    monkeypatch.setitem(runtimes.TASK_MODULES, generation, "openvino_genai_not_here")
    assert runtimes.resolve(spec()) == Runtime.CTRANSLATE2
    assert runtimes.resolve(spec(precision="bf16")) == Runtime.CTRANSLATE2  # no CPU bf16
    monkeypatch.setattr(base, "cpu_has_bf16", lambda: True)
    assert runtimes.resolve(spec(precision="bf16")) == Runtime.TORCH  # CT2: no CPU bf16
    with pytest.raises(EngineError) as no_genai:
        runtimes.resolve(spec(engine="openvino"))
    assert no_genai.value.status == 422 and "dify-mirror[openvino]" in no_genai.value.message
    monkeypatch.undo()
    assert runtimes.resolve(spec(engine="torch")) == Runtime.TORCH
    embed = {"modelId": "x/y", "task": "feature-extraction"}
    assert runtimes.resolve(DifyModelSpec.model_validate(embed)) == Runtime.OPENVINO
    cls = DifyModelSpec.model_validate(embed | {"task": "text-classification"})
    assert runtimes.resolve(cls) == Runtime.OPENVINO
    images = DifyModelSpec.model_validate(embed | {"task": "image-classification"})
    assert runtimes.resolve(images) == Runtime.TORCH
    monkeypatch.setattr(runtimes, "installed", lambda r, task=None: r == Runtime.TORCH)
    assert runtimes.resolve(spec()) == Runtime.TORCH
    assert runtimes.resolve(spec(device="cuda")) == Runtime.TORCH  # vllm not installed
    with pytest.raises(EngineError) as missing:
        runtimes.resolve(spec(engine="ctranslate2"))
    assert missing.value.status == 422 and "dify-mirror[ctranslate2]" in missing.value.message


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (
            {"engine": "ctranslate2", "precision": "bf16"},
            "runs precision fp32, int8 here, not bf16",
        ),
        ({"engine": "ctranslate2", "device": "cuda"}, "serves device cpu, not cuda"),
        ({"engine": "vllm"}, "serves device cuda, not cpu"),
        ({"engine": "vllm", "task": "feature-extraction"}, "serves text-generation"),
    ],
)
def test_an_engine_that_cannot_serve_the_spec_is_refused_by_name(
    fields: dict[str, str], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        spec(**fields)


def test_bf16_on_a_cpu_without_it_runs_fp32_and_says_so(
    demo: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "cpu_has_bf16", lambda: False)
    for engine in (
        TextGenerationEngine("demo", spec(engine="torch", precision="bf16"), str(demo)),
        CTranslate2Engine("demo", spec(precision="bf16"), str(demo), home=home),
        OpenVINOGenerationEngine("demo", spec(precision="bf16"), str(demo), home=home),
    ):
        info = engine.info()
        assert info["precision"] == "fp32", info
        assert info["engine_note"] == "bf16 asked, but this CPU has no bf16 support: running fp32"
    assert str(engine.dtype) == "torch.float32"


def test_an_openvino_worker_that_dies_fails_its_requests_and_the_health_check(
    ov: OpenVINOGenerationEngine,
) -> None:
    """The pipeline steps in a process of its own: a crash there (a SIGFPE in a kernel,
    the OOM killer) ends the requests it held with a 503, never a hang, and the replica's
    health check fails so that Serve replaces it."""
    import os
    import signal

    async def work(engine: OpenVINOGenerationEngine) -> tuple[Any, Any]:
        calls = [
            asyncio.ensure_future(engine.generate(GenerationRequest(prompt=p, max_tokens=400)))
            for p in PROMPTS
        ]
        await asyncio.sleep(0.3)
        assert engine.healthy() and engine.info()["active_requests"] == len(PROMPTS)
        assert engine.info()["resident_memory_bytes"] > 100_000_000  # the worker's too
        os.kill(engine._worker.pid, signal.SIGKILL)
        held = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        with pytest.raises(EngineError) as later:
            await engine.generate(GenerationRequest(prompt="hello", max_tokens=2))
        return held, later.value

    async def main() -> tuple[Any, Any]:
        await ov.start()
        return await work(ov)

    held, later = asyncio.run(main())
    assert {type(h) for h in held} == {EngineError}
    assert {(h.status, h.code, h.message) for h in held} == {  # retryable on another replica
        (503, "model_unavailable", "demo: the OpenVINO worker exited (code -9)")
    }
    assert (later.status, later.code) == (503, "model_unavailable")
    assert not ov.healthy()
    from dify_serving.deployments import ModelServer

    replica = SimpleNamespace(name="demo", engine=ov)  # what check_health reads
    with pytest.raises(RuntimeError, match="demo: the engine can no longer serve"):
        asyncio.run(ModelServer.func_or_class.check_health(replica))


def test_openvino_bf16_runs_in_bf16_from_the_fp32_conversion(
    demo: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "cpu_has_bf16", lambda: True)
    one_thread = OpenVINOGenerationEngine("demo", spec(precision="bf16"), str(demo), home=home)
    assert (one_thread.info()["precision"], one_thread.info()["engine_note"]) == (
        "fp32",
        "bf16 on OpenVINO needs at least 2 threads (resources.cpus): running fp32",
    )
    asyncio.run(one_thread.stop("test over"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    two = spec(precision="bf16", resources={"cpus": 2})
    engine = OpenVINOGenerationEngine("demo", two, str(demo), home=home)
    assert (engine.info()["precision"], engine.info().get("engine_note")) == ("bf16", None)
    requests = [GenerationRequest(prompt=p, max_tokens=8) for p in PROMPTS]
    answers = run(engine, lambda e: together(e, requests))
    assert [a.completion_tokens for a in answers] == [8] * len(PROMPTS)
    assert len(list((home / "compiled" / "openvino-genai").iterdir())) == 1  # one IR


def test_the_kv_cache_bound_is_the_same_for_torch_and_openvino() -> None:
    """One bound for every engine that pages its cache: half the concurrent sequences at
    up to 1,024 tokens, 64 to 4,096 pages of 64; OpenVINO (blocks of 32) never less than
    one sequence of the whole context."""
    assert textgen.kv_cache_tokens(1, 512) == 64 * 64  # the floor
    assert textgen.kv_cache_tokens(64, 512) == 64 * 512 // 2
    assert textgen.kv_cache_tokens(128, 8192) == 128 * 1024 // 2  # 1,024 tokens a sequence
    assert textgen.kv_cache_tokens(100_000, 4096) == 64 * 4096  # the ceiling
    assert textgen.kv_cache_tokens(1, 8192) == 8192  # one sequence of the whole context
    blocks = openvino_textgen.kv_cache_blocks
    assert blocks(spec(batching={"maxConcurrentRequests": 64}), 512) == 64 * 512 // 2 // 32
    assert blocks(spec(batching={"maxConcurrentRequests": 1}), 32768) == 32768 // 32


def test_torch_serves_a_request_of_the_whole_context_on_its_smallest_cache(
    demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no floor of pages, the cache is one sequence of the whole context (2,048
    tokens here): a request that fills it is answered, and so is the next."""
    monkeypatch.setattr(textgen, "MIN_KV_PAGES", 1)
    one = spec(engine="torch", batching={"maxConcurrentRequests": 1})
    engine = TextGenerationEngine("demo", one, str(demo))
    prompt = GenerationRequest(prompt=" ".join(["glacier"] * 2000))
    room = 2048 - len(engine.encode(prompt))
    assert 0 < room < 100

    async def work(e: TokenGenerator) -> list[Generation]:
        long = GenerationRequest(prompt=prompt.prompt, max_tokens=room)
        return [await e.generate(long), await e.generate(GenerationRequest(prompt="hi"))]

    long, short = run(engine, work)
    assert long.prompt_tokens + long.completion_tokens == 2048
    assert short.completion_tokens > 0


def test_torch_engine_whose_generation_loop_failed_is_unhealthy(
    demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers ends its generation thread when a request cannot fit the cache; the
    engine then accepts nothing, so its health check must fail (Serve replaces it)."""
    monkeypatch.setattr(textgen, "kv_cache_tokens", lambda *_: 128)
    engine = TextGenerationEngine("demo", spec(engine="torch"), str(demo))

    async def work(e: TokenGenerator) -> tuple[bool, EngineError]:
        healthy = e.healthy()
        with pytest.raises(EngineError) as failed:
            await e.generate(GenerationRequest(prompt="word " * 200, max_tokens=8))
        return healthy, failed.value

    healthy, failed = run(engine, work)
    assert healthy
    assert (failed.status, failed.code) == (503, "generation_failed")
    assert not engine.healthy()


def test_openvino_preempts_within_its_kv_bound_and_answers_as_alone(
    demo: Path, home: Path, ov: OpenVINOGenerationEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three blocks of 32 tokens for requests that each grow to two: the pipeline must
    preempt and resume sequences, and every answer is the one it gives alone."""
    requests = [GenerationRequest(prompt=p, max_tokens=40) for p in PROMPTS[:4]]

    async def one_by_one(engine: TokenGenerator) -> list[Generation]:
        return [await engine.generate(r) for r in requests]

    alone = run(ov, one_by_one)
    assert max(a.prompt_tokens + a.completion_tokens for a in alone) > 32  # two blocks
    monkeypatch.setattr(openvino_textgen, "kv_cache_blocks", lambda *_: 3)
    tight = OpenVINOGenerationEngine("demo", spec(engine="openvino"), str(demo), home=home)
    usage: list[float] = []

    async def together_watched(engine: TokenGenerator) -> list[Generation]:
        answers = asyncio.gather(*(engine.generate(r) for r in requests))
        while not answers.done():
            state = engine.queue_state() or {}
            usage.append(state.get("kv_cache_usage", 0.0))
            await asyncio.sleep(0.002)
        return list(await answers)

    answers = run(tight, together_watched)
    assert [a.text for a in answers] == [a.text for a in alone]
    assert max(usage) == pytest.approx(1.0)  # the bound was reached, never passed
    assert all(u <= 1.0 for u in usage)


def test_a_first_load_reports_its_conversion_as_load_progress(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages: list[str] = []
    monkeypatch.setattr(weights, "resolve", lambda *_a, **_k: str(demo))
    with progress.reporting(stages.append):
        registry.load_engine("m", spec(), tmp_path)
        registry.load_engine("m", spec(), tmp_path)  # cached: loads without converting
    size = f"{weights.weights_bytes(demo) / 1e6:,.1f} MB"
    assert weights.weights_bytes(demo) > 1_000_000
    assert stages == [
        "resolving builtin:demo-llm",
        f"loading weights ({size}) of builtin:demo-llm on openvino",
        "converting to OpenVINO (first load of these weights; cached afterwards)",
        "compiling the OpenVINO model (f32)",
        "resolving builtin:demo-llm",
        f"loading weights ({size}) of builtin:demo-llm on openvino",
        "compiling the OpenVINO model (f32)",
    ]
    progress.report("outside any reporting block: only logged")
    assert len(stages) == 7


def test_the_status_of_a_loading_model_is_its_replicas_stage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway's status cache: a model Serve still deploys shows what its replica
    published (converting, warming up) instead of Serve's bare message."""
    from dify_serving.gateway import status_cache
    from dify_serving.specs import DifyModel, ObjectMeta

    class Catalog:
        async def refresh(self) -> None: ...

        def models(self) -> dict[str, DifyModel]:
            return {n: DifyModel(metadata=ObjectMeta(name=n), spec=spec()) for n in ("a", "b")}

        def indexes(self) -> dict[str, Any]:
            return {}

    class Dashboard:
        async def get_applications(self) -> dict[str, Any]:
            app = {"status": "DEPLOYING", "message": "", "deployments": {}}
            running = [{"state": "RUNNING"}]
            ready = {**app, "status": "RUNNING", "deployments": {"M": {"replicas": running}}}
            return {"applications": {"model-a": app, "model-b": ready}}

    monkeypatch.setattr(
        status_cache,
        "loading_stages",
        lambda models: {"a": "converting to CTranslate2", "b": "stale"} if models else {},
    )
    cache = status_cache.StatusCache(Catalog(), Dashboard())  # type: ignore[arg-type]
    cache.cluster_gpus = 0.0
    models = asyncio.run(cache.refresh())
    assert (models["a"]["phase"], models["a"]["message"]) == (
        "Loading",
        "converting to CTranslate2",
    )
    assert models["b"]["phase"] == "Ready" and models["b"]["message"] != "stale"


def test_stopping_ends_running_and_queued_requests_with_the_reason(
    fast: TokenGenerator,
) -> None:
    async def work(engine: TokenGenerator) -> list[Any]:
        long = GenerationRequest(prompt=PROMPTS[4], max_tokens=400)
        calls = [asyncio.ensure_future(engine.generate(long)) for _ in range(4)]
        await asyncio.sleep(0.2)  # two batches decode; the others wait in the queue
        await engine.stop("model unloaded")
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)

    async def main() -> list[Any]:
        await fast.start()
        return await work(fast)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, EngineError) for o in outcomes), outcomes
    assert {o.message for o in outcomes} == {"demo: model unloaded"}


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_int8_serves_only_where_it_agrees_with_fp32_and_says_how_much(
    demo: Path, home: Path, monkeypatch: pytest.MonkeyPatch, threshold: float
) -> None:
    monkeypatch.setattr(ctranslate2_textgen, "INT8_AGREEMENT", threshold)
    engine = CTranslate2Engine("demo", spec(precision="int8"), str(demo), home=home)
    info = engine.info()
    assert 0.0 <= info["int8_agreement"] <= 1.0
    if threshold == 0.0:
        assert info["precision"] == "int8" and "engine_note" not in info
        out = run(engine, lambda e: e.generate(GenerationRequest(prompt="hello", max_tokens=4)))
        assert out.completion_tokens == 4
    else:  # below the bar: fp32, and the status says the agreement it measured
        assert info["precision"] == "fp32"
        assert info["engine_note"] == (
            f"int8 agreed with fp32 on {info['int8_agreement']:.2f} of the probe's greedy "
            "tokens (< 1.01): running fp32"
        )


@pytest.mark.parametrize(
    "fields",
    [
        {"precision": "int8", "engine": "torch"},
        {"precision": "int8", "device": "cuda"},
        {"precision": "int8", "task": "feature-extraction"},
    ],
)
def test_int8_is_refused_where_nothing_checks_it(fields: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="precision int8 is offered for text-generation on CPU"):
        spec(**fields)


def test_a_conversation_the_chat_template_refuses_is_a_422_with_its_words(demo: Path) -> None:
    """A template that raises (roles out of order, say) is the caller's error, with the
    template's own message; never a 500."""
    from transformers import AutoTokenizer

    from dify_serving.engines.prompts import encode

    tokenizer = AutoTokenizer.from_pretrained(demo)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversation roles must start with user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    ok = GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert encode(tokenizer, ok)
    refused = GenerationRequest(messages=[{"role": "tool", "content": "hi"}], max_tokens=1)
    with pytest.raises(EngineError) as caught:
        encode(tokenizer, refused)
    assert (caught.value.status, caught.value.code) == (422, "invalid_request")
    assert caught.value.message == (
        "messages: the model's chat template refused them: Conversation roles must start with user"
    )
