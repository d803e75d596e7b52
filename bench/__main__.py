"""`make bench`: HTTP through the real stack against in-process anchors, one run.

Generation (demo-llm, 2 threads): tokens/s at concurrency 1, 16, 64 through
`POST /v1/inference`, against (a) transformers `generate` one request at a time and
(b) a warmed, persistent in-process `ContinuousBatchingManager` fed the same requests.
Embeddings (MiniLM, 2 threads): sentences/s through `POST /v1/embeddings` at concurrency
32, one text per request, against sentence-transformers `encode(batch_size=32)`.
Writes docs/benchmarks.md.
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
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import knowledge, load, security

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
MAX_NEW = 64
#: Anchor and HTTP take turns this many times per figure; medians are reported.
ROUNDS = 5
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


# ---- in-process anchors ---------------------------------------------------------------
def generate_sequential(path: str, prompts: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        warm = tok("warm up", return_tensors="pt")["input_ids"]
        model.generate(input_ids=warm, max_new_tokens=4, do_sample=False)
        tokens, t0 = 0, time.perf_counter()
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            out = model.generate(
                input_ids=ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False
            )
            tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - t0)


class ManagerAnchor:
    """The library's own ceiling: one warmed, persistent manager, no HTTP, no asyncio."""

    def __init__(self, path: str) -> None:
        from transformers import (
            AutoModelForCausalLM,
            AutoTokenizer,
            ContinuousBatchingConfig,
            GenerationConfig,
        )

        self.tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.manager = model.init_continuous_batching(
            generation_config=GenerationConfig(
                do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=-1, pad_token_id=0
            ),
            continuous_batching_config=ContinuousBatchingConfig(
                num_blocks=1024, page_size=64, max_batch_tokens=1024, auto_switch_to_flash=False
            ),
        )
        self.manager.warmup()
        self.manager.start()
        self.run(["warm up"] * 4, 4)

    def run(self, prompts: list[str], concurrency: int) -> float:
        pending = iter(enumerate(prompts))
        in_flight, tokens = 0, 0
        t0 = time.perf_counter()

        def submit() -> bool:
            nonlocal in_flight
            item = next(pending, None)
            if item is None:
                return False
            i, p = item
            self.manager.add_request(
                self.tok(p)["input_ids"], request_id=f"{t0}-{i}", max_new_tokens=MAX_NEW
            )
            in_flight += 1
            return True

        while in_flight < concurrency and submit():
            pass
        while in_flight:
            out = self.manager.get_result(timeout=60)
            if out is None or not out.is_finished():
                continue
            tokens += len(out.generated_tokens)
            in_flight -= 1
            submit()
        return tokens / (time.perf_counter() - t0)

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=10)


class EncodeAnchor:
    """sentence-transformers `encode(batch_size=32)` in-process, loaded and warmed once."""

    def __init__(self, path: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.model.encode([sentence(i) for i in range(64)], batch_size=32)

    def run(self, texts: list[str]) -> float:
        t0 = time.perf_counter()
        self.model.encode(texts, batch_size=32)
        return len(texts) / (time.perf_counter() - t0)


# ---- HTTP ---------------------------------------------------------------------------------
def http_generation(base: str, concurrency: int, total: int) -> tuple[float, float]:
    def body(i: int) -> dict:
        return {"model": "demo-llm", "prompt": prompt(i), "max_tokens": MAX_NEW, "temperature": 0}

    result = asyncio.run(
        load.run(base, "/v1/inference", body, total, concurrency, keep_bodies=True)
    )
    assert result.errors == 0, result.bodies[:1]
    tokens = sum(json.loads(b)["usage"]["completion_tokens"] for b in result.bodies)
    return tokens / result.seconds, statistics.median(result.latencies)


def http_embeddings(
    base: str, texts: list[str], concurrency: int, model: str = "minilm"
) -> tuple[float, float]:
    def body(i: int) -> dict:
        return {"model": model, "input": texts[i], "encoding_format": "base64"}

    result = asyncio.run(load.run(base, "/v1/embeddings", body, len(texts), concurrency))
    assert result.errors == 0
    p99 = sorted(result.latencies)[int(len(result.latencies) * 0.99)]
    return result.requests / result.seconds, p99


SECTIONS = ("generation", "embeddings", "knowledge", "security")


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
    key = "dm_benchadmin01_" + secrets.token_hex(20)  # the stack's first admin key
    os.environ["DIFY_MIRROR_BOOTSTRAP_KEY"] = key
    load.HEADERS["Authorization"] = f"Bearer {key}"
    home = Path(tempfile.mkdtemp(prefix="dify-bench-"))
    settings = Settings(home=home, port=free_port(), ray_num_cpus=8, ray_dashboard_port=free_port())
    docs = bench_models()
    vectors = None
    if "knowledge" in sections:
        vectors = knowledge.corpus_vectors()
        search_index = knowledge.index_doc("bench", chunking={"maxTokens": 256, "overlap": 32})
        print("knowledge: building the 100k-chunk shard", flush=True)
        built = knowledge.build_shard(home.resolve(), search_index, vectors)
        print(f"  {built:.0f} s (upsert + HNSW)", flush=True)
        docs += [search_index, knowledge.index_doc("ingest", chunking={"maxTokens": 256})]
    stack = LocalStack(settings, object_store_memory=200 * 1024 * 1024)
    stack.start()
    try:
        stack.apply(parse_documents(docs))
        statuses = stack.wait(600)
        assert all(s["phase"] == "Ready" for s in statuses.values()), statuses
        base = f"http://127.0.0.1:{settings.port}"
        if "generation" in sections:
            rows += generation_rows(base, str(home.resolve() / "models" / "demo-llm"))
        if "embeddings" in sections:
            print("embeddings", flush=True)
            for model in ("minilm", "minilm-bf16"):
                rows.append(embedding_row(base, str(packaged_path("all-MiniLM-L6-v2")), model))
                print(rows[-1], flush=True)
        if vectors is not None:
            print("knowledge: search", flush=True)
            rows += knowledge.search_rows(base, "bench", vectors)
            print("knowledge: ingest", flush=True)
            rows += knowledge.ingest_rows(base, "ingest", 48)
            for row in rows[-4:]:
                print(row, flush=True)
    finally:
        stack.stop()
    write_report(rows)
    return 0


def bench_models() -> list[dict]:
    """demo-llm and MiniLM as every HTTP figure serves them."""
    return [
        model_doc(
            "demo-llm",
            "builtin:demo-llm",
            "text-generation",
            generation={"maxNewTokens": MAX_NEW, "temperature": 0},
            batching={"maxConcurrentRequests": 128},
        ),
        model_doc(
            "minilm",
            "sentence-transformers/all-MiniLM-L6-v2",
            "feature-extraction",
            batching={"maxBatchSize": 32, "batchWaitTimeoutMs": 10, "maxConcurrentRequests": 128},
        ),
        model_doc(
            "minilm-bf16",
            "sentence-transformers/all-MiniLM-L6-v2",
            "feature-extraction",
            precision="bf16",
            batching={"maxBatchSize": 32, "batchWaitTimeoutMs": 10, "maxConcurrentRequests": 128},
        ),
    ]


def generation_rows(base: str, llm_path: str) -> list[tuple[str, str, str, str]]:
    print("generation: anchors", flush=True)
    rows = []
    seq = generate_sequential(llm_path, [prompt(i) for i in range(6)])
    anchor = ManagerAnchor(llm_path)
    for c in (1, 16, 64):
        total = {1: 6, 16: 96, 64: 128}[c]
        anchor.run([prompt(i) for i in range(min(total, c * 2))], c)  # warm both at this level
        http(base, total, c)
        ceiling, rate, ratio, p50 = interleaved(
            functools.partial(anchor.run, [prompt(i) for i in range(total)], c),
            functools.partial(http_generation, base, c, total),
        )
        rows.append(
            (
                f"generation tok/s, concurrency {c}",
                f"{rate:.0f}",
                f"(a) generate one at a time {seq:.0f}; (b) CB manager {ceiling:.0f}",
                f"{ratio:.2f}× (b), {rate / seq:.1f}× (a); p50 {p50 * 1000:.0f} ms",
            )
        )
        print(rows[-1], flush=True)
    anchor.stop()
    return rows


def interleaved(
    anchor: Callable[[], float], http: Callable[[], tuple[float, float]]
) -> tuple[float, float, float, float]:
    """Anchor and HTTP take turns ROUNDS times, alternating which goes first, so drift on
    the shared cores hits both; returns the medians of the anchor's rate, the HTTP rate,
    the per-round ratio and the HTTP latency figure."""
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


def embedding_row(base: str, path: str, model: str = "minilm") -> tuple[str, str, str, str]:
    """A model's sentences/s over HTTP beside sentence-transformers fp32 in-process."""
    texts = [sentence(i) for i in range(1000)]
    anchor = EncodeAnchor(path)
    http_embeddings(base, texts[:64], 32, model)  # warm
    local, rate, ratio, p99 = interleaved(
        lambda: anchor.run(texts), lambda: http_embeddings(base, texts, 32, model)
    )
    label = "" if model == "minilm" else f" ({model}: engine auto, precision bf16)"
    return (
        f"embeddings sentences/s, concurrency 32{label}",
        f"{rate:.0f}",
        f"sentence-transformers encode(batch_size=32) {local:.0f}",
        f"{ratio:.2f}×; p99 {p99 * 1000:.0f} ms",
    )


def http(base: str, total: int, c: int) -> None:
    http_generation(base, c, min(total, c * 2))


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


def write_report(rows: list[tuple[str, str, str, str]]) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    table = _kept_rows(path, rows) + [list(r) for r in rows]
    order = {"generation": 0, "embeddings": 1, "search": 2, "ingest": 3, "security:": 4}
    table.sort(key=lambda r: order.get(r[0].split(" ", 1)[0], 9))
    lines = [
        "# Benchmarks",
        "",
        "Command: `make bench` (runs `python -m bench`). Each figure stands beside its "
        "anchor, measured in the same run on the same machine and model.",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{sys.version.split()[0]}; model replicas pin {THREADS} math threads; the load "
        "generator runs on the same cores.",
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
