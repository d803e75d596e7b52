"""What one request may carry, refused in the gateway before any replica (in-process).

The gateway here has no Ray behind it: a request that got past the checks would end in
a 503 from the replica lookup, so every 413/422 below was decided by the gateway alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from support import API_KEY, AUTH, free_port, index_doc, model_doc

from dify_serving.catalog.files import LocalStateStore
from dify_serving.engines.protocol import (
    Embeddings,
    EmbedRequest,
    GenerationRequest,
    Generator,
)
from dify_serving.gateway import coalesce, schemas
from dify_serving.gateway.app import create_app
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.state import GatewayState
from dify_serving.gateway.transport import transport_failure
from dify_serving.manifests import parse_documents
from dify_serving.options import GatewayOptions, LimitOptions, SecurityOptions, ServeOptions


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[TestClient]:
    """A secured gateway with one model and one index in its store, and a 4 KiB body cap."""
    minilm = model_doc("minilm", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction")
    state = parse_documents([minilm, index_doc("kb", "minilm")])
    options = GatewayOptions(
        home=str(tmp_path),
        limits=LimitOptions(max_body_bytes=4096, max_documents=3),
        security=SecurityOptions(),
    )
    gateway = GatewayState(options)
    LocalStateStore(options.home).save(state, ServeOptions(gateway=options))
    app = create_app(gateway)
    try:
        yield TestClient(app, headers=AUTH, raise_server_exceptions=False)
    finally:
        app.state.guard.close()


def _error(r: httpx.Response, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    message = str(r.json()["error"]["message"])
    for needle in needles:
        assert needle in message, message
    return message


def test_a_body_over_the_cap_is_413_before_parsing_and_audited(gateway: TestClient) -> None:
    bad_json = b"{" + b"x" * 5000  # never parsed: not a 400 malformed_json
    r = gateway.post(
        "/v1/inference", content=bad_json, headers={"content-type": "application/json"}
    )
    _error(r, 413, "DIFY_MIRROR_MAX_BODY_BYTES", "4096")
    assert r.json()["error"]["code"] == "payload_too_large"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    guard = gateway.app.state.guard  # type: ignore[attr-defined]
    guard.audit.flush()
    rows = guard.audit.query(route="/v1/inference")[0]
    assert (
        rows and rows[-1]["status"] == 413 and rows[-1]["request_id"] == r.headers["x-request-id"]
    )


@contextlib.contextmanager
def served(options: GatewayOptions) -> Iterator[str]:
    """The gateway app under uvicorn on a free port (real HTTP, one event loop)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(GatewayState(options)), port=port, log_config=None, lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_chunked_upload_is_counted_as_it_arrives(tmp_path: Path) -> None:
    options = GatewayOptions(
        home=str(tmp_path),
        limits=LimitOptions(max_body_bytes=4096),
        security=SecurityOptions(enabled=False),
    )
    sent: list[int] = []

    def chunks(total: int) -> Iterator[bytes]:
        body = b'{"text": "' + b"a" * total + b'", "rules": {}}'
        for start in range(0, len(body), 1000):
            sent.append(start)
            yield body[start : start + 1000]

    with served(options) as base, httpx.Client(base_url=base) as http:
        headers = {"content-type": "application/json"}
        r = http.post("/v1/data/clean", content=chunks(8000), headers=headers)
        assert r.request.headers["transfer-encoding"] == "chunked"
        _error(r, 413, "DIFY_MIRROR_MAX_BODY_BYTES", "4096")
        r = http.post("/v1/data/clean", content=chunks(2000), headers=headers)
        assert r.status_code == 200 and r.json()["chars_out"] == 2000  # under the cap: served


def test_without_a_key_the_body_is_not_even_looked_at(gateway: TestClient) -> None:
    r = gateway.post("/v1/inference", content=b"x" * 5000, headers={"Authorization": ""})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("path", "body", "status", "needles"),
    [
        (
            "/v1/inference",
            {"prompt": "x" * (schemas.MAX_TEXT_CHARS + 1)},
            413,
            ("prompt", "524288"),
        ),
        ("/v1/inference", {"model": "../x", "prompt": "hi"}, 422, ("model", "Kubernetes name")),
        ("/v1/inference", {"input": ["a"] * 2049}, 413, ("input", "2049", "2048")),
        ("/v1/embeddings", {"input": ["a"] * 10_000}, 413, ("input", "10000", "2048")),
        ("/v1/embeddings", {"input": ["a", "b" * 600_000]}, 413, ("input", "item 1", "524288")),
        ("/v1/data/embed", {"input": ["a"] * 2049}, 413, ("input", "2048")),
        ("/v1/completions", {"prompt": "x" * 600_000}, 413, ("prompt", "524288")),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x" * 300_000}] * 2},
            413,
            ("messages", "600000", "524288"),
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}] * 1025},
            422,
            ("messages", "1024"),
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "root", "content": "x"}]},
            422,
            ("messages", "role", "'user'"),
        ),
        (
            "/v1/chat/completions",
            {"index": "../../etc", "messages": [{"role": "user", "content": "x"}]},
            422,
            ("index", "Kubernetes name"),
        ),
        ("/v1/data/search", {"index": "kb", "vector": [0.5] * 4097}, 422, ("vector", "4096")),
        ("/v1/data/search", {"index": "kb", "query": "q" * 20_000}, 413, ("query", "16384")),
        (
            "/v1/data/search",
            {"index": "kb", "query": "q", "filter": {"document_id": ["d" * 100] * 200}},
            413,
            ("filter", "16384"),
        ),
        (
            "/v1/data/search",
            {"index": "kb", "query": "q", "filter": {f"k{i}": 1 for i in range(33)}},
            422,
            ("filter", "32"),
        ),
        ("/v1/data/search", {"index": "KB", "query": "q"}, 422, ("index", "Kubernetes name")),
        (
            "/v1/data/upsert",
            {"index": "kb", "documents": [{"id": "a", "text": "t", "metadata": {"k": "v" * 9000}}]},
            413,
            ("documents.0.metadata", "8192"),
        ),
        (
            "/v1/data/upsert",
            {
                "index": "kb",
                "documents": [{"id": "a", "text": "t", "metadata": {str(i): 1 for i in range(65)}}],
            },
            422,
            ("documents.0.metadata", "64"),
        ),
        (
            "/v1/data/upsert",
            {"index": "kb", "documents": [{"id": "i" * 513, "text": "t"}]},
            422,
            ("documents.0.id", "512"),
        ),
        (
            "/v1/data/delete",
            {"index": "kb", "document_ids": ["d"] * 4097},
            422,
            ("document_ids", "4096"),
        ),
        ("/v1/data/delete", {"index": "../kb", "document_ids": ["d"]}, 422, ("index",)),
        ("/v1/models/unload", {"name": "../../namespaces/x"}, 422, ("name", "Kubernetes name")),
        ("/v1/models/load", {"name": "a/b", "modelId": "builtin:demo-llm"}, 422, ("name",)),
    ],
)
def test_fields_over_their_bounds_are_refused_naming_field_and_limit(
    tmp_path: Path, path: str, body: dict[str, Any], status: int, needles: tuple[str, ...]
) -> None:
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    with TestClient(create_app(GatewayState(options)), raise_server_exceptions=False) as http:
        r = http.post(path, json=body)
    _error(r, status, *needles)
    assert r.json()["error"]["code"] == (
        "payload_too_large" if status == 413 else "invalid_request"
    )


def test_an_upsert_over_one_calls_budget_is_refused_however_it_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is summed once per document; a body under it is not measured at all."""
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")
    monkeypatch.setenv("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(64 * 1024))
    minilm = model_doc("minilm", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction")
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    gateway = GatewayState(options)
    LocalStateStore(tmp_path).save(
        parse_documents([minilm, index_doc("kb", "minilm")]), ServeOptions()
    )
    shipped: list[int] = []

    async def upsert_call(name: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
        shipped.append(len(docs))  # the index replica's side is not tested here
        return {"upserted": len(docs)}

    monkeypatch.setattr(gateway.index_replicas, "upsert", upsert_call)

    def upsert(documents: int, chunked: bool = False) -> httpx.Response:
        docs = [
            {"id": f"d{i}", "text": "é" * 5000, "metadata": {"k": "v" * 100}}
            for i in range(documents)
        ]
        body = json.dumps({"index": "kb", "documents": docs}).encode()  # é as \u00e9
        content: Any = iter([body[:1000], body[1000:]]) if chunked else body
        return http.post(
            "/v1/data/upsert", content=content, headers={"content-type": "application/json"}
        )

    with TestClient(create_app(gateway), raise_server_exceptions=False) as http:
        for chunked in (False, True):
            # 5 x (10,000 bytes of text + id + metadata) is over 3/4 of 64 KiB (49,152)
            _error(upsert(5, chunked), 413, "documents: 50550 bytes", "49152", "split the request")
            r = upsert(4, chunked)  # 40 KB fits (its body, 120 KB, does not: measured)
            assert r.status_code == 200, r.text
        assert upsert(1).status_code == 200  # a body under the budget is bound to fit
    assert shipped == [4, 4, 1]


def test_inference_holds_texts_to_embed_to_the_text_limit(tmp_path: Path) -> None:
    """/v1/inference admits 8 M characters per input (images); a text to embed is held to
    MAX_TEXT_CHARS there, as the embedding routes' schemas do."""
    minilm = model_doc("minilm", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction")
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    gateway = GatewayState(options)
    LocalStateStore(options.home).save(parse_documents([minilm]), ServeOptions())
    with TestClient(create_app(gateway), raise_server_exceptions=False) as http:
        body = {"model": "minilm", "input": ["a", "x" * (schemas.MAX_TEXT_CHARS + 1)]}
        r = http.post("/v1/inference", json=body)
    _error(r, 413, "input.1", "524289 characters", "524288")


def test_documents_over_the_per_upsert_maximum_become_a_bulk_ingestion_task(
    gateway: TestClient,
) -> None:
    docs = [{"id": str(i), "text": "t"} for i in range(4)]
    r = gateway.post("/v1/data/upsert", json={"index": "kb", "documents": docs})
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["kind"] == "upsert" and task["status"] == "PENDING"
    assert task["progress"] == {"documents_done": 0, "documents_total": 4, "chunks": 0}
    assert r.headers["location"] == f"/v1/tasks/{task['task_id']}"
    # the documents are checked before the task is accepted: a bad one refuses the lot
    docs[2]["id"] = "0"
    r = gateway.post("/v1/data/upsert", json={"index": "kb", "documents": docs})
    _error(r, 422, "documents.2.id", "appears twice")


_SERVER = """
import sys, uvicorn
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions
app = create_app(GatewayState(GatewayOptions.model_validate_json(sys.argv[1])))
uvicorn.run(app, port=int(sys.argv[2]), log_config=None, lifespan="off", access_log=False)
"""


@contextlib.contextmanager
def served_apart(options: GatewayOptions) -> Iterator[str]:
    """The gateway under uvicorn in its own process: the probes share no GIL with it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER, options.model_dump_json(), str(port)]
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(10)


def test_clean_runs_off_the_event_loop_while_healthz_answers(tmp_path: Path) -> None:
    """The issue's test: a large /v1/data/clean runs; /healthz answers within 100 ms."""
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    block = "<div><p>Some <b>bold</b> words and <a href='x'>a link</a> here.</p></div>\n"
    html = block * (3 * 1024 * 1024 // len(block))  # 3 MB of HTML
    body = json.dumps({"text": html}).encode()
    headers = {"content-type": "application/json"}
    with served_apart(options) as base:
        warm = httpx.post(f"{base}/v1/data/clean", content=body[:-10] + b'"}', headers=headers)
        assert warm.status_code == 200  # the cleaner runs: what follows is steady state
        done = threading.Event()
        result: dict[str, Any] = {}

        def clean() -> None:
            r = httpx.post(f"{base}/v1/data/clean", content=body, headers=headers, timeout=120)
            result["status"] = r.status_code
            done.set()

        worker = threading.Thread(target=clean)
        worker.start()
        latencies = []
        with httpx.Client(base_url=base, timeout=10) as http:
            time.sleep(0.05)  # the upload is in; the cleaning has begun
            while not done.is_set():
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
        worker.join()
    assert result["status"] == 200
    assert latencies and max(latencies) < 0.1, sorted(round(x * 1000) for x in latencies)[-8:]
    assert len(latencies) >= 3, "the clean finished before it could be observed"


# ---- the embedding coalescer: calls that fit the transport, a bounded queue ----------
class _Replica:
    """Stands in for `embed_each` on a replica: vectors whose first value is the position."""

    def __init__(self, dimension: int = 384, delay: float = 0.0) -> None:
        self.calls: list[list[tuple[list[str], bool, int]]] = []
        self.dimension, self.delay = dimension, delay

    async def __call__(self, requests: list[EmbedRequest]) -> list[Embeddings]:
        self.calls.append([(r.texts, r.truncate, r.offset) for r in requests])
        await asyncio.sleep(self.delay)
        out = []
        for r in requests:
            vectors = np.zeros((len(r.texts), self.dimension), np.float32)
            vectors[:, 0] = np.arange(r.offset, r.offset + len(r.texts))
            out.append(Embeddings(vectors, len(r.texts)))
        return out


def test_a_large_request_is_cut_into_calls_that_fit_and_put_back_in_order() -> None:
    replica = _Replica(dimension=1024)
    coalescer = coalesce.EmbedCoalescer(replica, "minilm")
    assert (coalescer.reply_bytes, coalescer.call_chars) == (2 * 1024 * 1024, 512 * 1024)
    texts = [f"text {i}" for i in range(6000)]
    result = asyncio.run(coalescer.embed(texts, False))
    assert result.vectors.shape == (6000, 1024) and result.prompt_tokens == 6000
    assert result.vectors[:, 0].tolist() == list(range(6000))
    for call in replica.calls:
        rows = sum(len(texts) for texts, _, _ in call)
        assert rows * 1024 * 4 <= coalescer.reply_bytes  # each reply stays small
    long_texts = ["x" * 100_000] * 12  # 1.2 M characters: cut by characters too
    replica.calls.clear()
    asyncio.run(coalesce.EmbedCoalescer(replica, "minilm").embed(long_texts, True))
    assert len(replica.calls) >= 3
    assert all(
        sum(len(t) for ts, _, _ in c for t in ts) <= coalescer.call_chars for c in replica.calls
    )


def test_the_coalescers_calls_follow_the_transports_message_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The local stack raises the limit to 64 MiB: calls grow with it, not past it."""
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")
    monkeypatch.setenv("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(64 * 1024 * 1024))
    replica = _Replica(dimension=1024)
    coalescer = coalesce.EmbedCoalescer(replica, "minilm")
    assert (coalescer.reply_bytes, coalescer.call_chars) == (32 * 1024 * 1024, 8 * 1024 * 1024)
    asyncio.run(coalescer.embed(["x" * 100_000] * 12, True))  # 1.2 M characters
    assert len(replica.calls) == 1  # three calls or more under the 4 MiB default
    monkeypatch.setenv("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(1024 * 1024))
    small = coalesce.EmbedCoalescer(replica, "minilm")
    assert (small.reply_bytes, small.call_chars) == (512 * 1024, 128 * 1024)
    replica.calls.clear()
    asyncio.run(small.embed(["x" * 100_000] * 12, True))
    assert len(replica.calls) >= 10 and all(
        sum(len(t) for ts, _, _ in c for t in ts) <= small.call_chars for c in replica.calls
    )


def test_requests_arriving_one_at_a_time_share_the_next_call() -> None:
    """gRPC hands calls to the loop one by one: once `EAGER_CALLS` calls run, those that
    arrive wait for one to end and go together, rather than each starting a call of one
    text."""
    replica = _Replica(delay=0.05)
    coalescer = coalesce.EmbedCoalescer(replica, "minilm")

    async def one_by_one() -> list[Embeddings]:
        first = asyncio.create_task(coalescer.embed(["t0"], False))
        await asyncio.sleep(0.005)  # the first call runs
        later = []
        for i in range(1, 6):
            later.append(asyncio.create_task(coalescer.embed([f"t{i}"], False)))
            await asyncio.sleep(0.001)  # each in a turn of the loop of its own
        return await asyncio.gather(first, *later)

    answers = asyncio.run(one_by_one())
    assert [len(a.vectors) for a in answers] == [1] * 6
    assert coalesce.EAGER_CALLS == 2
    assert [[texts for texts, _, _ in call] for call in replica.calls] == [
        [["t0"]],
        [["t1"]],
        [["t2"], ["t3"], ["t4"], ["t5"]],
    ]
    # enough waiting texts start a call beside the eager ones
    replica.calls.clear()

    async def burst() -> None:
        eager = []
        for text in "ab":  # two calls running
            eager.append(asyncio.create_task(coalescer.embed([text], False)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*eager, coalescer.embed(["c"] * coalesce.START_ROWS, False))

    asyncio.run(burst())
    assert [sum(len(t) for t, _, _ in call) for call in replica.calls] == [
        1,
        1,
        coalesce.START_ROWS,
    ]


def test_the_queue_of_waiting_texts_is_bounded_with_retry_after() -> None:
    coalescer = coalesce.EmbedCoalescer(_Replica(delay=0.2), "minilm")

    async def flood() -> list[Any]:
        calls = [coalescer.embed(["t"] * 2048, False) for _ in range(8)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(flood())
    refused = [o for o in outcomes if isinstance(o, ApiError)]
    assert refused and all(o.status == 503 and o.headers == {"Retry-After": "1"} for o in refused)
    assert "8192" in refused[0].message
    assert sum(isinstance(o, Embeddings) for o in outcomes) >= 4


# ---- errors never carry the transport's text ------------------------------------------
def _rpc_error(code: Any, details: str) -> Exception:
    import grpc
    from grpc.aio import AioRpcError, Metadata

    return AioRpcError(getattr(grpc.StatusCode, code), Metadata(), Metadata(), details)


def test_transport_errors_map_to_documented_codes_without_their_text() -> None:
    too_big = _rpc_error("RESOURCE_EXHAUSTED", "Received message larger than max (9 vs. 4)")
    error = transport_failure(too_big, "model", "minilm")
    assert error.status == 413 and error.code == "payload_too_large"
    assert "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH" in error.message
    down = RuntimeError("wrapped")
    down.__cause__ = _rpc_error("UNAVAILABLE", "failed to connect to all addresses; ipv4:10.0.0.3")
    error = transport_failure(down, "index", "kb")
    assert error.status == 503 and error.code == "index_unavailable"
    assert error.headers == {"Retry-After": "2"}
    for text in (error.message, transport_failure(too_big, "model", "x").message):
        assert (
            "AioRpcError" not in text and "10.0.0.3" not in text and "larger than max" not in text
        )


def test_an_unreachable_control_plane_is_a_fixed_503_without_its_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading with the Ray dashboard, or the Kubernetes API, on a closed port."""
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("DIFY_MIRROR_KUBE_API", dead)
    body = {"name": "demo-llm", "modelId": "builtin:demo-llm", "task": "text-generation"}
    answers = {}
    for control, extra in (("local", {"dashboard_url": dead}), ("kubernetes", {})):
        options = GatewayOptions(
            home=str(tmp_path / control),
            control=control,
            security=SecurityOptions(enabled=False),
            **extra,
        )
        with TestClient(create_app(GatewayState(options)), raise_server_exceptions=False) as http:
            answers[control] = http.post("/v1/models/load", json=body)
    expected = {
        "local": ("ray_unavailable", "Ray Serve cannot be reached to apply the change"),
        "kubernetes": ("kubernetes_unavailable", "the Kubernetes API cannot be reached"),
    }
    for control, r in answers.items():
        code, words = expected[control]
        assert r.status_code == 503 and r.headers["Retry-After"] == "2", r.text
        assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"]
        for leak in ("127.0.0.1", str(port), "connection attempts", "http"):
            assert leak not in r.text, r.text


def test_a_failed_models_message_hides_its_local_path_from_non_admin_keys(
    tmp_path: Path,
) -> None:
    weights_path = f"{tmp_path}/models/private-llm"
    local = model_doc("private-llm", weights_path, "text-generation")
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions())
    gateway = GatewayState(options)
    LocalStateStore(options.home).save(parse_documents([local]), ServeOptions(gateway=options))
    app = create_app(gateway)
    try:
        user = app.state.guard.keys.create("user", ["inference"]).key
        client = TestClient(app, raise_server_exceptions=False)
        gateway.status.models["private-llm"] = {
            "name": "private-llm",
            "phase": "Failed",
            "message": f"no weights in {weights_path} (config.json missing)",
            "ready_replicas": 0,
        }
        body = {"model": "private-llm", "prompt": "hi"}
        seen = {}
        for who, key in (("user", user), ("admin", API_KEY)):
            r = client.post("/v1/inference", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed", r.text
            seen[who] = r.json()["error"]["message"]
    finally:
        app.state.guard.close()
    assert weights_path not in seen["user"] and "<local path>" in seen["user"]
    assert "config.json missing" in seen["user"]
    assert weights_path in seen["admin"]  # admin sees where the weights should be


def test_clean_takes_no_more_than_one_document(tmp_path: Path) -> None:
    options = GatewayOptions(
        home=str(tmp_path),
        limits=LimitOptions(max_document_bytes=1000),
        security=SecurityOptions(enabled=False),
    )
    with TestClient(create_app(GatewayState(options)), raise_server_exceptions=False) as http:
        r = http.post("/v1/data/clean", json={"text": "é" * 501})
        _error(r, 413, "text", "1002 bytes", "1000")
        assert http.post("/v1/data/clean", json={"text": "é" * 500}).status_code == 200


def test_calls_in_flight_to_a_model_are_bounded_with_retry_after(tmp_path: Path) -> None:
    """Serve queues at the caller without end; the gateway refuses past its bound instead
    (2 replicas × 2 slots × (1 + QUEUED_PER_SLOT) calls), and frees the slots after."""
    from dify_serving.gateway import inflight

    small = model_doc("small", "builtin:demo-llm", "text-generation", replicas=2)
    small["spec"]["batching"] = {"maxConcurrentRequests": 2}
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    state = GatewayState(options)
    LocalStateStore(tmp_path).save(parse_documents([small]), ServeOptions(gateway=options))
    bound = (1 + inflight.QUEUED_PER_SLOT) * 2 * 2

    class Replica:  # stands in for a Serve handle: every call waits until released
        def __init__(self) -> None:
            self.release = asyncio.Event()
            self.started = 0

        def __getattr__(self, method: str) -> Any:
            return self

        def remote(self, *args: Any) -> Any:
            self.started += 1
            return self._answer()

        async def _answer(self) -> str:
            await self.release.wait()
            return "done"

    async def scenario() -> tuple[list[Any], int, str]:
        replica = Replica()
        state.model_replicas._handles["model-small"] = replica
        calls = [
            asyncio.ensure_future(
                state.model_replicas.invoke("small", Generator.generate, GenerationRequest("x"))
            )
            for _ in range(bound)
        ]
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as refused:
            await state.model_replicas.invoke("small", Generator.generate, GenerationRequest("x"))
        error = refused.value
        assert (error.status, error.code, error.headers) == (
            503,
            "overloaded",
            {"Retry-After": "1"},
        )
        replica.release.set()
        answers = await asyncio.gather(*calls)
        again = await state.model_replicas.invoke(  # the slots are free again
            "small", Generator.generate, GenerationRequest("x")
        )
        return answers, replica.started, again

    answers, started, again = asyncio.run(scenario())
    assert answers == ["done"] * bound and started == bound + 1 and again == "done"


def test_the_cleaning_process_leaves_with_the_gateway(tmp_path: Path) -> None:
    """A replica is killed rather than closed: its cleaning child must not outlive it."""
    script = (
        "import asyncio, os\n"
        "from dify_serving.gateway.cleaner import Cleaner\n"
        "from dify_serving.specs import Cleaning\n"
        "cleaner = Cleaner()\n"
        "asyncio.run(cleaner.clean('<p>x</p>' * 40000, Cleaning()))\n"
        "print(list(cleaner._pool._processes)[0], flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    child = int(out.stdout.strip().splitlines()[-1])

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return False

    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not gone():
        os.kill(child, 9)
        pytest.fail("the cleaning process outlived its gateway")
