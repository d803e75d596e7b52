"""gRPC against REST on the same stack: each RPC against its REST twin, same concurrency.

The gateway replica serves both ports (`gateway/rpc/server.py`), so the pair differs only
in the transport: protobuf over HTTP/2 (grpcio's futures, the calls multiplexed on one
channel) against JSON over HTTP/1.1 (`bench/load.py`, one connection per worker). Both
clients are closed loops in this process, taking turns, which goes first alternating,
so drift on the shared cores hits both; medians of the rounds. Each row
also gives the client's CPU per request (this process, gRPC's C threads included), so a
gap the client makes shows as such.

Every request carries a fresh nonce in its prompt, query or text, on both transports,
so the result cache (greedy inference, search by query) never answers one: each figure
is the full path, embedding and generation included.

Where to serve gRPC: one Serve deployment answers a fixed `GetModelStatus` through Ray
Serve's gRPC proxy and from a grpc.aio server on the replica's own port (what the
gateway does), in a process of its own with its own Ray (`python -m bench.grpc proxy`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from bench import load
from dify_serving.grpc import dify_pb2 as pb
from dify_serving.grpc import dify_pb2_grpc

#: Rounds per row, taking turns. Single rounds of one row ranged 0.82-1.27x on one host
#: (its speed drifts within minutes): a median of nine moves less with one slow round.
ROUNDS = 9
TARGET = 1.0
INDEX = "grpc"
DOCUMENTS = 200
#: (RPC, REST route, concurrency, requests per round)
CASES = (
    ("GenerateText", "/v1/inference", 16, 64),
    ("VectorSearch", "/v1/data/search", 16, 300),
    ("Embed", "/v1/data/embed", 16, 300),
)
GENERATE_TOKENS = 16
_nonce = itertools.count()
#: Seconds of this process's CPU per request, per transport, of the current row's rounds.
_CLIENT_CPU: dict[str, list[float]] = {"REST": [], "gRPC": []}
Row = tuple[str, str, str, str]


def index_doc() -> dict[str, Any]:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyIndex",
        "metadata": {"name": INDEX},
        "spec": {"embeddingModel": "minilm"},
    }


def _text(i: int) -> str:
    """A text no earlier request sent (the cache must miss)."""
    return f"request {next(_nonce)}: refunds shipping and returns for order {i}"


def _bodies(rpc: str, i: int) -> dict[str, Any]:
    """The REST body of request `i`; the message is built from the same fields."""
    if rpc == "GenerateText":
        return {
            "model": "demo-llm",
            "prompt": _text(i),
            "max_tokens": GENERATE_TOKENS,
            "temperature": 0,
        }
    if rpc == "VectorSearch":
        return {"index": INDEX, "query": _text(i), "top_k": 10}
    return {"model": "minilm", "input": [_text(i)]}


_MESSAGES = {
    "GenerateText": pb.TextRequest,
    "VectorSearch": pb.SearchRequest,
    "Embed": pb.EmbedRequest,
}


async def _rest(base: str, rpc: str, path: str, concurrency: int, total: int) -> float:
    cpu = time.process_time()
    result = await load.run(base, path, lambda i: _bodies(rpc, i), total, concurrency)
    _CLIENT_CPU["REST"].append((time.process_time() - cpu) / total)
    assert result.errors == 0, f"{path}: {result.errors} errors"
    return result.requests / result.seconds


async def _rpc(port: int, rpc: str, concurrency: int, total: int) -> tuple[float, float]:
    """Requests/s and the median latency of `total` calls, `concurrency` at a time on one
    channel (one HTTP/2 connection, as a gRPC client is meant to be used)."""
    return await asyncio.to_thread(_rpc_closed_loop, port, rpc, concurrency, total)


def _rpc_closed_loop(port: int, rpc: str, concurrency: int, total: int) -> tuple[float, float]:
    """`_rpc` on grpcio's own futures: each answer's callback (on gRPC's thread) sends the
    next call. The cheapest Python client grpcio offers: 0.22 ms of CPU per call here
    against 0.28 for `grpc.aio` in a loop (the REST client, raw sockets, costs 0.07), so
    the client's share of the two shared cores stays as small as it can be."""
    metadata = (("authorization", load.HEADERS["Authorization"]),)
    message = _MESSAGES[rpc]
    latencies: list[float] = []
    failures: list[BaseException] = []
    counter = iter(range(total))
    lock, done = threading.Lock(), threading.Event()
    left = [total]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        call = getattr(dify_pb2_grpc.DifyServiceStub(channel), rpc)

        def send() -> None:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            request = message(**_bodies(rpc, i))
            future = call.future(request, metadata=metadata, timeout=120)
            future.add_done_callback(functools.partial(answered, time.perf_counter()))

        def answered(t0: float, future: grpc.Future) -> None:
            latencies.append(time.perf_counter() - t0)
            if future.exception() is not None:
                failures.append(future.exception())  # type: ignore[arg-type]
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
            send()

        cpu, started = time.process_time(), time.perf_counter()
        for _ in range(concurrency):
            send()
        done.wait()
        seconds = time.perf_counter() - started
        _CLIENT_CPU["gRPC"].append((time.process_time() - cpu) / total)
    assert not failures, f"{rpc}: {len(failures)} failed calls, e.g. {failures[0]!r}"
    return total / seconds, statistics.median(latencies)


async def _turns(
    rest: Callable[[], Awaitable[float]], rpc: Callable[[], Awaitable[tuple[float, float]]]
) -> tuple[float, float, float, float]:
    """Medians of REST req/s, gRPC req/s, the per-round ratio and gRPC's p50."""
    rests, rpcs, ratios, p50s = [], [], [], []
    for r in range(ROUNDS):
        if r % 2:
            (rate, p50), base = await rpc(), await rest()
        else:
            base = await rest()
            rate, p50 = await rpc()
        print(f"  round {r + 1}: gRPC {rate:.1f} against {base:.1f}", flush=True)
        rests.append(base)
        rpcs.append(rate)
        ratios.append(rate / base)
        p50s.append(p50)
    a, h, q, lat = (statistics.median(x) for x in (rests, rpcs, ratios, p50s))
    return a, h, q, lat


async def _fill(base: str) -> None:
    """DOCUMENTS short documents in the index, so a search has something to rank."""
    docs = [{"id": f"d{i}", "text": _text(i)} for i in range(DOCUMENTS)]
    body = {"index": INDEX, "documents": docs}
    result = await load.run(base, "/v1/data/upsert", lambda i: body, 1, 1, keep_bodies=True)
    assert result.errors == 0, result.bodies


async def grpc_rows(base: str, port: int, engines: dict[str, str]) -> list[Row]:
    """One row per RPC against its REST twin; `engines` names what serves each model."""
    await _fill(base)
    rows = []
    for rpc, path, concurrency, total in CASES:
        await _rest(base, rpc, path, concurrency, concurrency * 2)  # warm both
        await _rpc(port, rpc, concurrency, concurrency * 2)
        for kept in _CLIENT_CPU.values():
            kept.clear()
        rest, rate, ratio, p50 = await _turns(
            functools.partial(_rest, base, rpc, path, concurrency, total),
            functools.partial(_rpc, port, rpc, concurrency, total),
        )
        served = {
            "GenerateText": f"demo-llm: {engines.get('demo-llm', '?')}, {GENERATE_TOKENS} tokens",
            "VectorSearch": f"index {INDEX}, {DOCUMENTS} documents, top 10 by query text",
            "Embed": f"minilm: {engines.get('minilm', '?')}, one text",
        }[rpc]
        met = "met" if ratio >= TARGET else "NOT met"
        cpu = {k: statistics.median(v) * 1000 for k, v in _CLIENT_CPU.items()}
        rows.append(
            (
                f"grpc: {rpc} req/s, concurrency {concurrency} ({served})",
                f"{rate:.1f}",
                f"REST POST {path} {rest:.1f}",
                f"{ratio:.2f}× (target ≥ {TARGET}: {met}); gRPC p50 {p50 * 1000:.1f} ms; "
                f"client CPU/request gRPC {cpu['gRPC']:.2f} ms, REST {cpu['REST']:.2f} ms",
            )
        )
        print(rows[-1], flush=True)
    return rows


# ---- Serve's gRPC proxy against the replica's own port --------------------------------
PROXY_CONCURRENCY, PROXY_CALLS = 16, 400
#: What `LocalStack._fast_path_environment` sets before Ray starts.
SERVE_ENVIRONMENT = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
#: Serve's proxy routes by this metadata; the replica's own server ignores it.
_APPLICATION = (("application", "fixed"),)
_SERVICER = "dify_serving.grpc.dify_pb2_grpc.add_DifyServiceServicer_to_server"


def _fixed() -> pb.ModelStatusResponse:
    return pb.ModelStatusResponse(models=[pb.ModelStatus(name="fixed", phase="Ready")])


class _Fixed(dify_pb2_grpc.DifyServiceServicer):
    async def GetModelStatus(self, request: Any, context: Any) -> pb.ModelStatusResponse:
        return _fixed()


async def _status_rate(port: int, concurrency: int, total: int) -> tuple[float, float]:
    """`GetModelStatus` calls/s and p50 on `port`, no credentials (the servicer is trivial)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(concurrency)
    ]
    await asyncio.gather(*(c.channel_ready() for c in channels))
    counter = iter(range(total))
    latencies: list[float] = []

    async def worker(channel: grpc.aio.Channel) -> None:
        call = dify_pb2_grpc.DifyServiceStub(channel).GetModelStatus
        for _ in counter:
            t0 = time.perf_counter()
            answer = await call(pb.ModelStatusRequest(), metadata=_APPLICATION, timeout=60)
            latencies.append(time.perf_counter() - t0)
            assert answer.models[0].name == "fixed"

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in channels))
    seconds = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in channels))
    return total / seconds, statistics.median(latencies)


def proxy_main(proxy_port: int, own_port: int, http_port: int) -> None:
    """One Serve deployment answering `GetModelStatus` two ways: through Serve's gRPC
    proxy (`proxy_port`) and from a grpc.aio server on the replica's own loop
    (`own_port`, as `gateway/rpc/server.py` does); prints the row as JSON."""
    import json

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    @serve.deployment(name="FixedStatus")
    class FixedStatus:
        async def __init__(self) -> None:  # type: ignore[misc]
            self.server = grpc.aio.server()
            dify_pb2_grpc.add_DifyServiceServicer_to_server(_Fixed(), self.server)
            self.server.add_insecure_port(f"127.0.0.1:{own_port}")
            await self.server.start()

        async def GetModelStatus(self, request: Any) -> pb.ModelStatusResponse:
            return _fixed()

    os.environ.update(SERVE_ENVIRONMENT)  # as `LocalStack` runs Serve
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=proxy_port, grpc_servicer_functions=[_SERVICER]),
    )
    app = FixedStatus.bind()  # type: ignore[attr-defined]
    serve.run(app, name="fixed", route_prefix="/fixed")  # None: no route on the proxy

    async def measure() -> tuple[float, float, float, float]:
        c, n = PROXY_CONCURRENCY, PROXY_CALLS
        await _routed(proxy_port)
        await _status_rate(proxy_port, c, n)  # warm both
        await _status_rate(own_port, c, n)
        return await _turns(
            lambda: _first(_status_rate(proxy_port, c, n)),
            lambda: _status_rate(own_port, c, n),
        )

    try:
        proxy, own, ratio, p50 = asyncio.run(measure())
    finally:
        serve.shutdown()
        ray.shutdown()
    row = (
        f"grpc: GetModelStatus req/s, concurrency {PROXY_CONCURRENCY}, a fixed answer, "
        "served by a grpc.aio server on the Serve replica's own port",
        f"{own:.0f}",
        f"the same deployment through Ray Serve's gRPC proxy {proxy:.0f}",
        f"{ratio:.2f}× (the proxy's hop and actor calls); replica's own port p50 "
        f"{p50 * 1000:.1f} ms",
    )
    print("ROW " + json.dumps(row), flush=True)


async def _routed(port: int, within_s: float = 60.0) -> None:
    """Until Serve's proxy has the application in its route table."""
    deadline = time.monotonic() + within_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = dify_pb2_grpc.DifyServiceStub(channel).GetModelStatus
        while True:
            try:
                await call(pb.ModelStatusRequest(), metadata=_APPLICATION, timeout=10)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


async def _first(pair: Awaitable[tuple[float, float]]) -> float:
    return (await pair)[0]


def proxy_rows() -> list[Row]:
    """`proxy_main` in its own process (its own Ray), before the stack starts."""
    import json
    import socket
    import subprocess

    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(str(s.getsockname()[1]))
    done = subprocess.run(
        [sys.executable, "-m", "bench.grpc", "proxy", *ports],
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    assert done.returncode == 0 and found, done.stdout[-2000:] + done.stderr[-4000:]
    return [tuple(json.loads(found[-1]))]  # type: ignore[list-item]


if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        proxy_main(*(int(a) for a in sys.argv[2:5]))
