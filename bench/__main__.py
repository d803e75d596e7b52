"""`make bench`: HTTP through the real stack against in-process anchors, one run.

Generation (2 threads, through `POST /v1/inference`): demo-llm's tokens/s at concurrency
1, 16, 64 against (a) transformers `generate` one request at a time and (b) a warmed,
persistent in-process `ContinuousBatchingManager` fed the same requests; then the 58 M
Llama shape at concurrency 64 served four ways (engine torch, engine auto in fp32 and in
bf16, engine ctranslate2) against the same manager in fp32, and its time to first token
at concurrency 1 against transformers `generate`. Embeddings (MiniLM, 2 threads):
sentences/s through `POST /v1/embeddings` at concurrency 32, fp32 and bf16: 32 texts per
request against sentence-transformers `encode(batch_size=32)` (the targets), one text per
request against the same engine in-process (the gateway's cost per request); and 32
texts per request against fastembed on the same weights exported to ONNX. Knowledge: searches of a
100k-chunk index and ingestion, and the result cache's hit against a miss. Tasks: a
batch of 64 prompts in one request against 64 requests, and 1,000 async generation tasks
against the same prompts sent synchronously at concurrency 16. Cold start: the first
request to MiniLM scaled to zero against a warm request on the replica it woke
(`coldstart`). Every figure takes turns with its anchor (`interleaved`). `python -m
bench SECTION...` runs some sections and keeps the others' rows. Writes
docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import platform
import secrets
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import batch, cache, coldstart, knowledge, load, metrics, security, tasks
from bench import grpc as rpc_bench
from bench.anchors import (
    SAME_VECTORS,
    EncodeAnchor,
    EngineEmbedAnchor,
    FastembedAnchor,
    FirstTokenAnchor,
    ManagerAnchor,
    generate_sequential,
    min_cosine,
)
from bench.ceiling import Ceiling

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
MAX_NEW = 64
#: Anchor and HTTP take turns this many times per figure; medians are reported.
ROUNDS = 5
#: The 58 M shape served four ways: name → (spec fields, target over the fp32 CB
#: manager in-process, or what the row shows where it has no target).
SHAPE_58M: dict[str, tuple[dict[str, str], float | str]] = {
    "demo-llm-58m-torch": (
        {"engine": "torch"},
        "the same engine in-process: the gateway's own cost",
    ),
    "demo-llm-58m": ({"engine": "auto"}, 2.5),
    "demo-llm-58m-ct2": (
        {"engine": "ctranslate2"},
        "the runner-up: what auto ran in fp32 before OpenVINO GenAI",
    ),
    "demo-llm-58m-bf16": ({"engine": "auto", "precision": "bf16"}, 3.0),
}
#: Requests per round at concurrency 64 (two waves), and prompts per time-to-first-token.
SHAPE_REQUESTS, FIRST_TOKEN_PROMPTS = 128, 8
#: Embeddings targets over sentence-transformers fp32 (issue 12), and fastembed's.
EMBEDDING_TARGETS = {"minilm": 2.0, "minilm-bf16": 3.5}
FASTEMBED_TARGET = 1.2
WORDS = (
    "serving models on kubernetes needs batching streaming status and careful limits so the "
    "gateway stays fast while replicas scale with the load they see"
).split(" ")


def prompt(i: int, n: int = 24) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def sentence(i: int) -> str:
    return f"Sentence {i}: " + " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(12))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_doc(name: str, model_id: str, task: str, **spec: object) -> dict:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": name},
        "spec": {"modelId": model_id, "task": task, "resources": {"cpus": THREADS}} | spec,
    }


# ---- HTTP ---------------------------------------------------------------------------------
def http_generation(
    base: str, concurrency: int, total: int, model: str = "demo-llm"
) -> tuple[float, float]:
    """tokens/s and the median latency of `total` greedy requests."""
    rate, p50, _ = http_generation_texts(base, concurrency, total, model)
    return rate, p50


def http_generation_texts(
    base: str, concurrency: int, total: int, model: str
) -> tuple[float, float, list[str]]:
    """As `http_generation`, with the answers' texts in prompt order."""

    def body(i: int) -> dict:
        return {"model": model, "prompt": prompt(i), "max_tokens": MAX_NEW, "temperature": 0}

    result = asyncio.run(
        load.run(base, "/v1/inference", body, total, concurrency, keep_bodies=True)
    )
    assert result.errors == 0, result.bodies[:1]
    answers = [json.loads(b) for b in result.bodies]
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    rate, p50 = tokens / result.seconds, statistics.median(result.latencies)
    return rate, p50, [a["output"] for a in answers]


def http_first_token(base: str, model: str, prompts: list[str]) -> tuple[float, float]:
    """Streamed requests one at a time: the medians of the time to the first SSE event
    (the first token that decodes to text) and of the whole answer (16 tokens)."""

    def body(i: int) -> dict:
        return {
            "model": model,
            "prompt": prompts[i],
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        }

    result = asyncio.run(load.run(base, "/v1/inference", body, len(prompts), 1))
    assert result.errors == 0 and len(result.first_chunks) == len(prompts), result
    return statistics.median(result.first_chunks), statistics.median(result.latencies)


def http_embeddings(
    base: str, texts: list[str], concurrency: int, model: str = "minilm", per_request: int = 1
) -> tuple[float, float]:
    """sentences/s and the p99 latency; `per_request` texts in each request's `input`."""

    def body(i: int) -> dict:
        chunk = texts[i] if per_request == 1 else texts[i * per_request : (i + 1) * per_request]
        return {"model": model, "input": chunk, "encoding_format": "base64"}

    requests = -(-len(texts) // per_request)
    result = asyncio.run(load.run(base, "/v1/embeddings", body, requests, concurrency))
    assert result.errors == 0
    p99 = sorted(result.latencies)[int(len(result.latencies) * 0.99)]
    return len(texts) / result.seconds, p99


def served(base: str) -> dict[str, str]:
    """Per model, the engine and precision the status route says serve it."""
    import httpx

    answer = httpx.get(f"{base}/v1/models/status", headers=load.HEADERS, timeout=60)
    answer.raise_for_status()
    return {m["name"]: f"engine {m['engine']}, {m['precision']}" for m in answer.json()["models"]}


SECTIONS = (
    "generation",
    "embeddings",
    "knowledge",
    "tasks",
    "coldstart",
    "security",
    "metrics",
    "grpc",
)


def main(argv: list[str]) -> int:
    import torch

    from dify_serving.engines.weights import packaged_path
    from dify_serving.local import LocalStack
    from dify_serving.manifests import parse_documents
    from dify_serving.settings import Settings

    sections = [a for a in argv if a in SECTIONS] or list(SECTIONS)
    torch.set_num_threads(THREADS)
    rows: list[tuple[str, str, str, str]] = []
    if "security" in sections:
        print("security: the guard's cost", flush=True)
        rows += security.security_rows(free_port(), free_port())
        print(rows[-1], flush=True)
        if sections == ["security"]:
            write_report(rows)
            return 0
    if "metrics" in sections:
        print("metrics: request metrics on against off", flush=True)
        rows += metrics.overhead_rows(free_port(), free_port())
        print(rows[-1], flush=True)
    if "grpc" in sections:  # its own Ray, before the stack's
        print("grpc: Serve's gRPC proxy against the replica's own port", flush=True)
        rows += rpc_bench.proxy_rows()
        print(rows[-1], flush=True)
    key = "dm_benchadmin01_" + secrets.token_hex(20)  # the stack's first admin key
    os.environ["DIFY_MIRROR_BOOTSTRAP_KEY"] = key
    load.HEADERS["Authorization"] = f"Bearer {key}"
    home = Path(tempfile.mkdtemp(prefix="dify-bench-"))
    docs = bench_models(generation="generation" in sections)
    if "coldstart" in sections:  # MiniLM that sleeps when idle
        docs.append(coldstart.model_doc())
    cpus = max(8, THREADS * len(docs))  # Ray's logical CPUs: every replica gets its share
    settings = Settings(
        home=home,
        port=free_port(),
        grpc_port=free_port(),
        ray_num_cpus=cpus,
        ray_dashboard_port=free_port(),
    )
    vectors = None
    if "knowledge" in sections:
        vectors = knowledge.corpus_vectors()
        search_index = knowledge.index_doc("bench", chunking={"maxTokens": 256, "overlap": 32})
        print("knowledge: building the 100k-chunk shard", flush=True)
        built = knowledge.build_shard(home.resolve(), search_index, vectors)
        print(f"  {built:.0f} s (upsert + HNSW)", flush=True)
        docs += [search_index, knowledge.index_doc("ingest", chunking={"maxTokens": 256})]
    elif "metrics" in sections:  # two indexes for the scrape
        docs += [knowledge.index_doc("metrics-a"), knowledge.index_doc("metrics-b")]
    if "grpc" in sections:
        docs.append(rpc_bench.index_doc())
    stack = LocalStack(settings, object_store_memory=200 * 1024 * 1024)
    stack.start()
    try:
        stack.apply(parse_documents(docs))
        statuses = stack.wait(600)
        assert all(s["phase"] == "Ready" for s in statuses.values()), statuses
        base = f"http://127.0.0.1:{settings.port}"
        engines = served(base)
        print(engines, flush=True)
        models = home.resolve() / "models"
        if "generation" in sections:  # engines, not the result cache: the prompts repeat
            with load.uncached():
                rows += generation_rows(base, str(models / "demo-llm"), engines["demo-llm"])
                rows += shape_rows(base, str(models / "demo-llm-58m"), engines)
        if "embeddings" in sections:
            minilm = str(packaged_path("all-MiniLM-L6-v2"))
            with load.uncached():
                rows += embedding_rows(base, minilm, home.resolve(), engines)
        if vectors is not None:
            print("knowledge: search", flush=True)
            rows += knowledge.search_rows(base, "bench", vectors)
            print("cache: hit against miss", flush=True)
            rows += asyncio.run(cache.cache_rows(base, "bench"))
            print("knowledge: ingest", flush=True)
            rows += knowledge.ingest_rows(base, "ingest", 48)
            for row in rows[-6:]:
                print(row, flush=True)
        if "tasks" in sections:
            print("batch: 64 prompts in one request against 64 requests", flush=True)
            rows += asyncio.run(batch.batch_rows(base, engines["demo-llm"], rounds=ROUNDS))
            print(rows[-1], flush=True)
            print(f"tasks: {tasks.TASKS} async generation tasks against sync", flush=True)
            rows += asyncio.run(tasks.task_rows(base, engines["demo-llm"]))
            print(rows[-1], flush=True)
        if "coldstart" in sections:
            print("cold start: a model scaled to zero against a warm request", flush=True)
            rows += coldstart.cold_start_rows(base)
            print(rows[-1], flush=True)
        if "metrics" in sections:
            print("metrics: a scrape of the whole stack", flush=True)
            indexes = ["bench", "ingest"] if vectors is not None else ["metrics-a", "metrics-b"]
            rows += metrics.scrape_rows(base, ["demo-llm", "minilm", "minilm-bf16"], indexes)
            print(rows[-1], flush=True)
        if "grpc" in sections:
            print("grpc: each RPC against its REST twin", flush=True)
            rows += asyncio.run(rpc_bench.grpc_rows(base, settings.grpc_port, engines))
    finally:
        stack.stop()
    write_report(rows)
    return 0


def bench_models(generation: bool = False) -> list[dict]:
    """demo-llm and MiniLM as every HTTP figure serves them. With `generation` (this
    checkout's generation rows), demo-llm pinned to engine torch, so that its rows stay
    HTTP against the same engine in-process, and the 58 M Llama shape four ways;
    bench.compare leaves both out: an older checkout knows neither."""
    embedding = {"maxBatchSize": 32, "batchWaitTimeoutMs": 10, "maxConcurrentRequests": 128}
    docs = [
        model_doc(
            "demo-llm",
            "builtin:demo-llm",
            "text-generation",
            generation={"maxNewTokens": MAX_NEW, "temperature": 0},
            batching={"maxConcurrentRequests": 128},
            **({"engine": "torch"} if generation else {}),
        ),
        model_doc(
            "minilm",
            "sentence-transformers/all-MiniLM-L6-v2",
            "feature-extraction",
            batching=embedding,
        ),
        model_doc(
            "minilm-bf16",
            "sentence-transformers/all-MiniLM-L6-v2",
            "feature-extraction",
            precision="bf16",
            batching=embedding,
        ),
    ]
    if generation:  # a context of 512 keeps each torch replica's KV cache to 256 pages of 64
        docs += [
            model_doc(
                name,
                "builtin:demo-llm-58m",
                "text-generation",
                generation={"maxNewTokens": MAX_NEW, "temperature": 0, "maxContextTokens": 512},
                batching={"maxConcurrentRequests": 64},
                **fields,
            )
            for name, (fields, _) in SHAPE_58M.items()
        ]
    return docs


def generation_rows(base: str, llm_path: str, engine: str) -> list[tuple[str, str, str, str]]:
    """demo-llm over HTTP against the same engine in-process: the gateway's own cost."""
    print("generation: anchors", flush=True)
    rows = []
    seq = generate_sequential(llm_path, [prompt(i) for i in range(6)], MAX_NEW)
    anchor = ManagerAnchor(llm_path, MAX_NEW)
    for c in (1, 16, 64):
        total = {1: 6, 16: 96, 64: 128}[c]
        anchor.run([prompt(i) for i in range(min(total, c * 2))], c)  # warm both at this level
        http_generation(base, c, min(total, c * 2))
        ceiling, rate, ratio, p50 = interleaved(
            functools.partial(anchor.run, [prompt(i) for i in range(total)], c),
            functools.partial(http_generation, base, c, total),
        )
        rows.append(
            (
                f"generation tok/s, concurrency {c} (demo-llm: {engine})",
                f"{rate:.0f}",
                f"(a) generate one at a time {seq:.0f}; (b) CB manager {ceiling:.0f}",
                f"{ratio:.2f}× (b), {rate / seq:.1f}× (a); p50 {p50 * 1000:.0f} ms",
            )
        )
        print(rows[-1], flush=True)
    anchor.stop()
    return rows


def shape_rows(base: str, path: str, engines: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """The 58 M shape: tokens/s at concurrency 64 of each way it is served against the
    fp32 CB manager in-process, then the time to first token against `generate`."""
    print("generation: the 58 M shape", flush=True)
    rows = []
    prompts = [prompt(i) for i in range(SHAPE_REQUESTS)]
    anchor = ManagerAnchor(path, MAX_NEW, num_blocks=256)
    anchor.run(prompts, 64)
    for name, (_, target) in SHAPE_58M.items():
        answers: list[str] = []  # the last HTTP round's, to set beside the anchor's

        def http(model: str = name, into: list[str] = answers) -> tuple[float, float]:
            rate, p50, into[:] = http_generation_texts(base, 64, SHAPE_REQUESTS, model)
            return rate, p50

        http()  # warm at this level
        ceiling, rate, ratio, p50 = interleaved(functools.partial(anchor.run, prompts, 64), http)
        same = sum(a == b for a, b in zip(anchor.texts(), answers, strict=True))
        verdict = f"{ratio:.2f}× ({target})" if isinstance(target, str) else meets(ratio, target)
        rows.append(
            (
                f"generation tok/s, concurrency 64, 58 M shape, greedy ({name}: {engines[name]})",
                f"{rate:.0f}",
                f"transformers CB manager, fp32 {ceiling:.0f}",
                f"{verdict}; greedy text as the anchor's {same}/{len(answers)}; "
                f"p50 {p50 * 1000:.0f} ms",
            )
        )
        print(rows[-1], flush=True)
    anchor.stop()
    rows.append(first_token_row(base, path, "demo-llm-58m", engines))
    print(rows[-1], flush=True)
    return rows


def first_token_row(
    base: str, path: str, model: str, engines: dict[str, str]
) -> tuple[str, str, str, str]:
    """Time to first token at concurrency 1, streamed over HTTP, against `generate`."""
    prompts = [prompt(i) for i in range(FIRST_TOKEN_PROMPTS)]
    anchor = FirstTokenAnchor(path)
    http_first_token(base, model, prompts[:2])  # warm
    local, first, ratio, whole = interleaved(
        lambda: anchor.run(prompts), lambda: http_first_token(base, model, prompts)
    )
    return (
        f"generation time to first token, concurrency 1, 58 M shape ({model}: {engines[model]})",
        f"p50 {first * 1000:.0f} ms (streamed; 16 tokens in {whole * 1000:.0f} ms)",
        f"transformers generate, fp32, first token p50 {local * 1000:.0f} ms",
        meets(ratio, 1.0, at_most=True),
    )


def meets(ratio: float, target: float, at_most: bool = False) -> str:
    """`2.61× (target ≥ 2.5×: met)`."""
    met = ratio <= target if at_most else ratio >= target
    bound = "≤" if at_most else "≥"
    return f"{ratio:.2f}× (target {bound} {target}×: {'met' if met else 'not met'})"


def interleaved(
    anchor: Callable[[], float], http: Callable[[], tuple[float, float]]
) -> tuple[float, float, float, float]:
    """Anchor and HTTP take turns ROUNDS times, alternating which goes first, so drift on
    the shared cores hits both; returns the medians of the anchor's figure, the HTTP
    figure, the per-round ratio (HTTP over anchor) and the HTTP latency figure. A figure
    is a rate, or a time where lower is better (then so is the ratio)."""
    anchors, rates, ratios, latencies = [], [], [], []
    for r in range(ROUNDS):
        if r % 2:
            (rate, latency), base = http(), anchor()
        else:
            base = anchor()
            rate, latency = http()
        anchors.append(base)
        rates.append(rate)
        ratios.append(rate / base)
        latencies.append(latency)
    a, h, q, lat = (statistics.median(x) for x in (anchors, rates, ratios, latencies))
    return a, h, q, lat


def embedding_rows(
    base: str, path: str, home: Path, engines: dict[str, str]
) -> list[tuple[str, str, str, str]]:
    """MiniLM fp32 and bf16: 32 texts per request against sentence-transformers fp32 (the
    targets), each followed by the ceiling this CPU's matmuls set (`bench/ceiling.py`), one
    text per request against the same engine in-process (the gateway's cost per request);
    then fastembed against fp32 and bf16, 32 texts per request."""
    from dify_serving.specs import DifyModelSpec

    print("embeddings", flush=True)
    single, lists = [sentence(i) for i in range(1000)], [sentence(i) for i in range(2048)]
    anchor = EncodeAnchor(path, single[:64])
    specs = {d["metadata"]["name"]: d["spec"] for d in bench_models()}
    rows = []
    ceiling = Ceiling(anchor.model, lists[:256], THREADS)
    for model, target in EMBEDDING_TARGETS.items():
        http_embeddings(base, lists[:1024], 32, model, 32)  # warm
        precision = "bf16" if model.endswith("bf16") else "fp32"
        local, rate, ratio, p99 = interleaved(
            ceiling.beside(functools.partial(anchor.run, lists), precision),
            functools.partial(http_embeddings, base, lists, 32, model, 32),
        )
        rows.append(
            (
                f"embeddings sentences/s, concurrency 32, 32 texts per request "
                f"({model}: {engines[model]})",
                f"{rate:.0f}",
                f"sentence-transformers encode(batch_size=32), fp32 {local:.0f}",
                f"{meets(ratio, target)}; p99 {p99 * 1000:.0f} ms",
            )
        )
        print(rows[-1], flush=True)
        rows.append(ceiling.row(precision, model, rate, target))
        print(rows[-1], flush=True)
        spec = DifyModelSpec.model_validate(specs[model])
        engine = EngineEmbedAnchor(model, spec, path, home)
        http_embeddings(base, single[:256], 32, model)  # warm
        local, rate, ratio, p99 = interleaved(
            functools.partial(engine.run, single, 32),
            functools.partial(http_embeddings, base, single, 32, model),
        )
        engine.close()
        rows.append(
            (
                f"embeddings sentences/s, concurrency 32, one text per request "
                f"({model}: {engines[model]})",
                f"{rate:.0f}",
                f"the same engine in-process, one text per call {local:.0f}",
                f"{ratio:.2f}× (the gateway's cost per request: no target, which the 32-texts "
                f"row carries); p99 {p99 * 1000:.0f} ms",
            )
        )
        print(rows[-1], flush=True)
    texts = lists
    fastembed = FastembedAnchor(path, home / "fastembed", THREADS, texts[:64])
    probe = [sentence(i) * (1 + i % 3) for i in range(64)]  # lengths 1-3×, so padding too
    agree = min_cosine(fastembed.vectors(probe), anchor.vectors(probe))
    assert agree >= SAME_VECTORS, (
        f"fastembed on the ONNX export of MiniLM does not match sentence-transformers "
        f"(lowest cosine {agree:.6f} < {SAME_VECTORS}): the export is wrong, so timing it "
        "would compare different models"
    )
    pairs: tuple[tuple[str, float | None], ...] = (
        ("minilm", FASTEMBED_TARGET),
        ("minilm-bf16", None),
    )
    for model, goal in pairs:
        rows.append(fastembed_row(base, fastembed, texts, model, engines[model], goal))
        print(rows[-1], flush=True)
    return rows


def fastembed_row(
    base: str,
    fastembed: FastembedAnchor,
    texts: list[str],
    model: str,
    engine: str,
    target: float | None,
) -> tuple[str, str, str, str]:
    """MiniLM over HTTP, 32 texts a request, against fastembed in-process on the same
    weights (fp32: ONNX Runtime on CPU has no other precision)."""
    http_embeddings(base, texts[:1024], 32, model, 32)  # warm
    local, rate, ratio, p99 = interleaved(
        lambda: fastembed.run(texts), lambda: http_embeddings(base, texts, 32, model, 32)
    )
    verdict = (
        meets(ratio, target)
        if target is not None
        else f"{ratio:.2f}× (what precision bf16 gives a fastembed user; no target)"
    )
    return (
        f"embeddings sentences/s vs fastembed on the same weights (ONNX export), "
        f"concurrency 32, 32 texts per request ({model}: {engine})",
        f"{rate:.0f}",
        f"fastembed embed(batch_size=32), {THREADS} threads, fp32 {local:.0f} "
        f"(its vectors checked: cosine ≥ {SAME_VECTORS} to sentence-transformers')",
        f"{verdict}; p99 {p99 * 1000:.0f} ms",
    )


def _kept_rows(path: Path, fresh: list[tuple[str, str, str, str]]) -> list[list[str]]:
    """Rows of sections not run this time stay (each was measured beside its anchor)."""
    if not path.exists():
        return []
    ran = {row[0].split(" ", 1)[0] for row in fresh}
    kept = []
    for line in path.read_text().split("<!-- notes -->", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        row = len(cells) == 4 and line.startswith("| ") and cells[0] not in ("figure", "---")
        if row and cells[0].split(" ", 1)[0] not in ran:
            kept.append(cells)
    return kept


def cpu_model() -> str:
    """The CPU's name and the instructions the engines' speed depends on."""
    from dify_serving.engines.base import cpu_has_bf16

    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info if "model name" in line), "")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    isa += " and AMX" if "amx_tile" in flags else ""
    return f"{name or 'unknown CPU'}, {isa}, {'with' if cpu_has_bf16() else 'no'} bf16"


def write_report(rows: list[tuple[str, str, str, str]]) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    table = _kept_rows(path, rows) + [list(r) for r in rows]
    order = {
        "generation": 0,
        "embeddings": 1,
        "search": 2,
        "ingest": 3,
        "cache:": 4,
        "batch": 5,
        "async": 6,
        "cold": 7,
        "security:": 8,
        "metrics:": 9,
        "grpc:": 10,
    }
    table.sort(key=lambda r: order.get(r[0].split(" ", 1)[0], 9))
    lines = [
        "# Benchmarks",
        "",
        "Command: `make bench` (runs `python -m bench`). Each figure stands beside its "
        "anchor, measured in the same run on the same machine and model.",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.machine()}, Python "
        f"{sys.version.split()[0]}; model replicas pin {THREADS} math threads; the load "
        "generator runs on the same cores. Rows of sections not run in the last "
        "`make bench` keep the figures of the run that measured them.",
        "",
        "| figure | HTTP (this stack) | anchor (in-process) | ratio |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table],
        "",
    ]
    notes = (
        path.read_text().split("<!-- notes -->", 1)[1]
        if path.exists() and "<!-- notes -->" in path.read_text()
        else "\n"
    )
    path.write_text("\n".join(lines) + "<!-- notes -->" + notes)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
