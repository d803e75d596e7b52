"""`make soak`: a bounded mixed load on `dify-mirror serve`, from a second process, with
every process of the stack measured before and after.

A leak does not make one request slow; it makes memory or file descriptors climb with the
number of requests. So the stack is the one `make run` serves (examples/quickstart.yaml:
demo-llm, minilm, the `docs` index, the embedded task queue), started as a user starts it
(`dify-mirror serve -f`, on free ports, with a bootstrap admin key: no rate limit applies),
and this process only sends requests on loopback (bench/load.py's raw HTTP/1.1
connections) and reads /proc. Six kinds of work run side by side, CONNECTIONS each:
inference, the same streamed as SSE, embeddings, upserts to the index (ids cycle over
UPSERT_IDS documents, so the index holds a fixed amount while every upsert replaces one),
searches, and async tasks (submit, then poll `GET /v1/tasks/{id}` until the task ends).
Every text carries its request's number, so the result cache fills and evicts as it does
in service rather than answering from one entry.

Stop rule: SOAK_SECONDS of load (default 120), or with SOAK_REQUESTS=N, N requests of
each kind. Each process of the stack (the serve driver and all its descendants: GCS,
raylet, dashboard, the Serve controller, the gateway and model replicas, task consumers)
is measured after a warm-up of every kind and again once the load has drained; its
resident memory is also sampled during the load for the peak. Exit 1 on any error (a
status other than the route's success, an SSE `error` event, a task that did not
complete, a transport error or a request past REQUEST_TIMEOUT_S) or when a process grows
past the bound: RSS by more than max(RSS_BOUND_MIB MiB, RSS_BOUND_SHARE of its start),
or FD_BOUND more file descriptors.

`python -m bench.soak [--seconds S | --requests N] [--json PATH] [-f MANIFEST]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load
from bench.__main__ import ROOT, cpu_model, free_port, prompt, sentence
from bench.knowledge import percentile, query_text
from bench.processes import (
    FD_BOUND,
    MIB,
    RSS_BOUND_MIB,
    RSS_BOUND_SHARE,
    RssSampler,
    growth_rows,
    processes,
)

CONNECTIONS = 2
WARMUP = 16
MAX_TOKENS = 16
UPSERT_IDS = 256
POLL_S = 0.1
REQUEST_TIMEOUT_S = 120.0
SETTLE_S = 5.0
INDEX, LLM, EMBEDDER = "docs", "demo-llm", "minilm"
#: The bootstrap key's id must be 12 characters (`dm_<id>_<secret>`).
KEY_ID = "soakadmin001"


@dataclass
class Route:
    """What one route answered: a latency per request and errors by kind."""

    name: str
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0

    def note(self, seconds: float, error: str | None, body: bytes = b"") -> None:
        self.latencies.append(seconds)
        self.ended = time.perf_counter()
        if error:
            self.errors[error] += 1
            if len(self.examples) < 3:
                self.examples.append(f"{error}: {body[:300]!r}")

    def summary(self) -> dict[str, Any]:
        n, took = len(self.latencies), max(self.ended - self.started, 1e-9)
        return {
            "route": self.name,
            "requests": n,
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "error_examples": self.examples,
            "per_second": n / took if n else 0.0,
            "p50_ms": percentile(self.latencies, 0.5) * 1000 if n else None,
            "p99_ms": percentile(self.latencies, 0.99) * 1000 if n else None,
        }


class Client:
    """One persistent connection; a transport failure or a hang is an error, and the
    next request opens a fresh connection."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.conn = load.Connection(self.host, self.port)

    async def call(
        self,
        route: Route,
        path: str,
        body: dict[str, Any] | None,
        ok: int = 200,
        check: Callable[[bytes], str | None] | None = None,
    ) -> bytes | None:
        """The answer's body when the route succeeded (and `check` found nothing)."""
        payload = None if body is None else json.dumps(body).encode()
        t0 = time.perf_counter()
        try:
            status, answer = await asyncio.wait_for(
                self.conn.post(path, payload), REQUEST_TIMEOUT_S
            )
        except (OSError, EOFError, ValueError, IndexError, TimeoutError) as exc:
            self.close()
            self.conn = load.Connection(self.host, self.port)
            route.note(time.perf_counter() - t0, f"transport {type(exc).__name__}")
            return None
        error = str(status) if status != ok else (check(answer) if check else None)
        route.note(time.perf_counter() - t0, error, answer)
        return None if error else answer

    def close(self) -> None:
        self.conn.close()


def _sse_error(body: bytes) -> str | None:
    if b"event: error" in body:
        return "SSE error event"
    return None if body.rstrip().endswith(b"data: [DONE]") else "SSE without [DONE]"


class Mix:
    """The six kinds of work; `steps` maps a kind to one request of it (number `i`)."""

    def __init__(self) -> None:
        names = (
            "POST /v1/inference",
            "POST /v1/inference (SSE)",
            "POST /v1/embeddings",
            "POST /v1/data/upsert",
            "POST /v1/data/search",
            "POST /v1/inference/async",
            "GET /v1/tasks/{id}",
            "task: submit to COMPLETED",
        )
        self.routes = {name: Route(name) for name in names}
        self.steps: dict[str, Callable[[Client, int], Awaitable[None]]] = {
            "inference": self.infer,
            "stream": self.stream,
            "embed": self.embed,
            "upsert": self.upsert,
            "search": self.search,
            "task": self.task,
        }

    def _generation(self, i: int, tag: str) -> dict[str, Any]:
        return {"model": LLM, "prompt": f"{tag} {i}: {prompt(i)}", "max_tokens": MAX_TOKENS}

    async def infer(self, client: Client, i: int) -> None:
        route = self.routes["POST /v1/inference"]
        await client.call(route, "/v1/inference", self._generation(i, "sync"))

    async def stream(self, client: Client, i: int) -> None:
        body = self._generation(i, "stream") | {"stream": True}
        route = self.routes["POST /v1/inference (SSE)"]
        await client.call(route, "/v1/inference", body, check=_sse_error)

    async def embed(self, client: Client, i: int) -> None:
        body = {"model": EMBEDDER, "input": [sentence(i * 4 + k) for k in range(4)]}
        await client.call(self.routes["POST /v1/embeddings"], "/v1/embeddings", body)

    async def upsert(self, client: Client, i: int) -> None:
        text = " ".join(sentence(i * 8 + k) for k in range(8))
        document = {"id": f"soak-{i % UPSERT_IDS}", "text": text, "metadata": {"source": "soak"}}
        body = {"index": INDEX, "documents": [document]}
        await client.call(self.routes["POST /v1/data/upsert"], "/v1/data/upsert", body)

    async def search(self, client: Client, i: int) -> None:
        body = {"index": INDEX, "query": f"{query_text(i)} {i}", "top_k": 5}
        await client.call(self.routes["POST /v1/data/search"], "/v1/data/search", body)

    async def task(self, client: Client, i: int) -> None:
        t0 = time.perf_counter()
        submit = self.routes["POST /v1/inference/async"]
        answer = await client.call(submit, "/v1/inference/async", self._generation(i, "task"), 202)
        if answer is None:
            return
        task_id = json.loads(answer)["task_id"]
        while True:
            answer = await client.call(
                self.routes["GET /v1/tasks/{id}"], f"/v1/tasks/{task_id}", None
            )
            if answer is None:
                return
            status = json.loads(answer)["status"]
            if status not in ("PENDING", "RUNNING"):
                break
            await asyncio.sleep(POLL_S)
        error = None if status == "COMPLETED" else f"task {status}"
        self.routes["task: submit to COMPLETED"].note(time.perf_counter() - t0, error, answer)


class Stop:
    """Hands out request numbers per kind until the deadline or the count is reached."""

    def __init__(self, seconds: float | None, requests: int | None, first: int = 0) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.requests, self.first = requests, first
        self.issued: Counter[str] = Counter()

    def next(self, kind: str) -> int | None:
        done = self.issued[kind]
        if self.requests is not None and done >= self.requests:
            return None
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return None
        self.issued[kind] = done + 1
        return self.first + done


async def drive(base: str, stop: Stop) -> tuple[Mix, float]:
    """Every kind on CONNECTIONS connections until `stop` says so; the wall seconds."""
    mix = Mix()

    async def worker(kind: str, step: Callable[[Client, int], Awaitable[None]]) -> None:
        client = Client(base)
        try:
            while (i := stop.next(kind)) is not None:
                await step(client, i)
        finally:
            client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k, s) for k, s in mix.steps.items() for _ in range(CONNECTIONS)))
    return mix, time.perf_counter() - t0


# ---- the stack ------------------------------------------------------------------------
def start_stack(manifest: Path, key: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`dify-mirror serve -f MANIFEST` on free ports; returns once it says it serves."""
    home = Path(tempfile.mkdtemp(prefix="dify-soak-"))
    port = free_port()
    env = os.environ | {
        "DIFY_MIRROR_HOME": str(home),
        "DIFY_MIRROR_BOOTSTRAP_KEY": key,
        "DIFY_MIRROR_RAY_DASHBOARD_PORT": str(free_port()),
        "DIFY_MIRROR_GRPC_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
    }
    command = [str(Path(sys.executable).with_name("dify-mirror")), "serve", "-f", str(manifest)]
    log = home / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 900
    while b"dify-mirror serving on" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_stack(proc, {})
            raise RuntimeError(f"the stack did not start; {log}:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return proc, f"http://127.0.0.1:{port}", log


def check_ready(base: str) -> None:
    import httpx

    answer = httpx.get(f"{base}/v1/models/status", headers=load.HEADERS, timeout=60)
    answer.raise_for_status()
    phases = {m["name"]: m["phase"] for m in answer.json()["models"]}
    if any(phase != "Ready" for phase in phases.values()):
        raise RuntimeError(f"not every model is Ready: {phases}")


def stop_stack(proc: subprocess.Popen[bytes], known: dict[int, dict[str, Any]]) -> None:
    """SIGINT (serve stops Ray itself); past two minutes, kill it and what it started."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *known]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---- report ---------------------------------------------------------------------------
def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MIB:.0f}"


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


def _errors(route: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(route["errors_by_kind"].items()))
    return f"{route['errors']} ({kinds})" if kinds else "0"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Soak: {report['stop_rule']}; {report['load_seconds']:.0f} s of load, "
        f"{CONNECTIONS} connections per kind; {report['machine']}; {report['date']}.",
        "",
        "| route | requests | errors | req/s | p50 ms | p99 ms |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in report["routes"]:
        p50, p99 = (f"{r[k]:.0f}" if r[k] is not None else "–" for k in ("p50_ms", "p99_ms"))
        lines.append(
            f"| {r['route']} | {r['requests']} | {_errors(r)} | {r['per_second']:.1f} | "
            f"{p50} | {p99} |"
        )
    lines += [
        "",
        f"Bound per process: RSS +max({RSS_BOUND_MIB} MiB, {RSS_BOUND_SHARE:.0%} of before), "
        f"open FDs +{FD_BOUND}. Before: after a warm-up of {WARMUP} requests of each kind; "
        f"after: {SETTLE_S:.0f} s after the load ended; peak: sampled every 2 s during it.",
        "",
        "| process | RSS before MiB | after | peak | growth | FDs before | after | growth | "
        "within bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in report["processes"]:
        grown = p.get("rss_growth")
        verdict = p.get("note") or ("yes" if p["within_bound"] else "**no**")
        cells = [
            p["process"],
            _mib(p["rss_before"]),
            _mib(p["rss_after"]),
            _mib(p["rss_peak"]),
            "–" if grown is None else f"{grown / MIB:+.1f}",
            _count(p["fds_before"]),
            _count(p["fds_after"]),
            "–" if grown is None else f"{p['fds_growth']:+d}",
            verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    kept = "" if report["passed"] else f" (the stack's log and state: {report['serve_log']})"
    lines += ["", f"{verdict}{kept}; {report['total_seconds']:.0f} s in all."]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--seconds", type=float, default=None, help="load for this long")
    rule.add_argument("--requests", type=int, default=None, help="requests of each kind")
    p.add_argument("--json", type=Path, help="write the report here as JSON")
    p.add_argument("-f", "--file", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    requests = args.requests or (int(os.environ.get("SOAK_REQUESTS") or 0) or None)
    seconds = None if requests else args.seconds or float(os.environ.get("SOAK_SECONDS", 120))
    stop_rule = f"{requests} requests of each kind" if requests else f"{seconds:.0f} s"
    key = f"dm_{KEY_ID}_" + secrets.token_hex(20)
    load.HEADERS["Authorization"] = f"Bearer {key}"
    t0 = time.monotonic()
    print(f"soak: starting the stack ({args.file.name})", flush=True)
    proc, base, log = start_stack(args.file, key)
    known: dict[int, dict[str, Any]] = {}
    try:
        check_ready(base)
        print(f"soak: warm-up, {WARMUP} requests of each kind", flush=True)
        warm, _ = asyncio.run(drive(base, Stop(None, WARMUP, first=10**6)))
        time.sleep(SETTLE_S)
        known = before = processes(proc.pid)
        print(f"soak: load, {stop_rule}, {len(before)} processes measured", flush=True)
        sampler = RssSampler(proc.pid)
        sampler.start()
        mix, seconds_run = asyncio.run(drive(base, Stop(seconds, requests)))
        sampler.halt.set()
        sampler.join()
        time.sleep(SETTLE_S)
        after = processes(proc.pid)
        known = before | after
    finally:
        stop_stack(proc, known)
    rows, failures = growth_rows(before, after, sampler.peaks())
    for row in rows:
        points = sampler.series.get(row["pid"], [])
        row["rss_series_mib"] = [(t, round(rss / MIB, 1)) for t, rss in points]
    routes = [r.summary() for r in mix.routes.values()]
    warm_errors = sum(sum(r.errors.values()) for r in warm.routes.values())
    failures += [f"{r['route']}: {_errors(r)} errors" for r in routes if r["errors"]]
    if warm_errors:
        failures.append(f"{warm_errors} errors during the warm-up")
    report = {
        "command": "python -m bench.soak " + " ".join(argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPUs ({cpu_model()})",
        "stop_rule": stop_rule,
        "load_seconds": seconds_run,
        "total_seconds": time.monotonic() - t0,
        "bounds": {"rss_mib": RSS_BOUND_MIB, "rss_share": RSS_BOUND_SHARE, "fds": FD_BOUND},
        "routes": routes,
        "warmup_errors": {r.name: dict(r.errors) for r in warm.routes.values() if r.errors},
        "processes": rows,
        "serve_log": str(log),
        "passed": not failures,
        "failures": failures,
    }
    print(markdown(report), flush=True)
    if report["passed"]:  # else kept: the serve log and state tell what went wrong
        shutil.rmtree(log.parent, ignore_errors=True)
        report["serve_log"] = None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
