"""This checkout against another one (an older commit), on the hot paths, in the same run.

`python -m bench.compare /path/to/old/checkout` starts, side by side:

- two local stacks (Ray, Serve, the gateway, demo-llm and MiniLM), one from each
  checkout, and loads them in turns: generation tok/s through `POST /v1/inference` at
  concurrency 16 and embeddings sentences/s through `POST /v1/embeddings` at 32;
- two gateways with security on and two with it off (`bench.security`'s set-up: `GET
  /v1/models` with auth + rate limit + audit), likewise in turns.

Each round alternates which checkout goes first, so drift on the shared cores hits both;
the figures are medians over the rounds and the ratio is new / old. A checkout runs with
`PYTHONPATH` pointing at its own `serving/` (the editable install is this checkout's; a
module missing there falls back to it, so compare commits with the same layout of
entry points: `LocalStack`, `Settings`, `create_app`, `GatewayState`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import load

HERE = Path(__file__).resolve().parents[1]
ROUNDS = 5
#: Per round: generation requests at concurrency 16, sentences at concurrency 32.
GENERATIONS, SENTENCES = 96, 1000

_SERVE_STACK = """
import json, sys, time
from pathlib import Path
from dify_serving.local import LocalStack
from dify_serving.manifests import parse_documents
from dify_serving.settings import Settings

home, port, dashboard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
settings = Settings(home=Path(home), port=port, ray_num_cpus=8, ray_dashboard_port=dashboard)
stack = LocalStack(settings, object_store_memory=200 * 1024 * 1024)
stack.start()
stack.apply(parse_documents(json.loads(sys.argv[4])))
statuses = stack.wait(600)
assert all(s["phase"] == "Ready" for s in statuses.values()), statuses
print("ready", flush=True)
try:
    sys.stdin.read()
finally:
    stack.stop()
"""


def _env(checkout: Path, key: str) -> dict[str, str]:
    serving = checkout / "serving"
    return {
        **os.environ,
        "PYTHONPATH": f"{serving}{os.pathsep}{checkout}",
        "DIFY_MIRROR_BOOTSTRAP_KEY": key,
        "HF_HUB_OFFLINE": "1",
    }


def _stack(checkout: Path, key: str) -> tuple[subprocess.Popen[str], str]:
    from bench.__main__ import bench_models, free_port

    docs = bench_models()
    port = free_port()
    home = tempfile.mkdtemp(prefix="dify-compare-")
    args = [home, str(port), str(free_port()), json.dumps(docs)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE_STACK, *args],
        cwd=checkout,
        env=_env(checkout, key),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the stack of {checkout} did not start")
    return proc, f"http://127.0.0.1:{port}"


def _gateway(checkout: Path, home: Path, on: bool, env: dict[str, str]) -> tuple[Any, int]:
    from bench.__main__ import free_port

    port = free_port()
    script = (
        "import sys; from bench.security import serve; "
        "serve(sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'on')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(home), str(port), "on" if on else "off"],
        cwd=HERE,  # this checkout's bench package; the gateway code is the checkout's
        env={**env, "PYTHONPATH": f"{checkout / 'serving'}{os.pathsep}{HERE}"},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not start")


def _requests_per_s(base: str, path: str, body: Any, total: int, c: int) -> float:
    result = asyncio.run(load.run(base, path, body, total, c))
    assert result.errors == 0, f"{result.errors} requests to {base}{path} failed"
    return float(result.requests / result.seconds)


def _pairs(old: Any, new: Any) -> tuple[float, float, float]:
    """Medians of old, new and new/old over ROUNDS alternating rounds."""
    olds, news, ratios = [], [], []
    for r in range(ROUNDS):
        if r % 2:
            n, o = new(), old()
        else:
            o, n = old(), new()
        olds.append(o)
        news.append(n)
        ratios.append(n / o)
    return statistics.median(olds), statistics.median(news), statistics.median(ratios)


def main(old_checkout: Path) -> list[tuple[str, float, float, float]]:
    from bench.__main__ import http_embeddings, http_generation, sentence
    from bench.security import CONCURRENCY, REQUESTS

    key = "dm_benchadmin01_" + secrets.token_hex(20)
    load.HEADERS["Authorization"] = f"Bearer {key}"
    rows = []
    stacks = [_stack(old_checkout, key), _stack(HERE, key)]
    try:
        (_, old), (_, new) = stacks
        texts = [sentence(i) for i in range(SENTENCES)]
        for base in (old, new):  # warm
            http_generation(base, 16, 32)
            http_embeddings(base, texts[:64], 32)
        rows.append(
            (
                "generation tok/s, concurrency 16",
                *_pairs(
                    lambda: http_generation(old, 16, GENERATIONS)[0],
                    lambda: http_generation(new, 16, GENERATIONS)[0],
                ),
            )
        )
        print(rows[-1], flush=True)
        rows.append(
            (
                "embeddings sentences/s, concurrency 32",
                *_pairs(
                    lambda: http_embeddings(old, texts, 32)[0],
                    lambda: http_embeddings(new, texts, 32)[0],
                ),
            )
        )
        print(rows[-1], flush=True)
    finally:
        for proc, _ in stacks:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(120)
    rows += _guard_rows(old_checkout, REQUESTS, CONCURRENCY)
    return rows


def _guard_rows(old_checkout: Path, requests: int, c: int) -> list[tuple[str, float, float, float]]:
    rows = []
    for on in (True, False):
        gateways = [_guarded_gateway(checkout, on) for checkout in (old_checkout, HERE)]
        try:
            old, new = (functools.partial(_guard_rate, g, requests, c) for g in gateways)
            old(), new()  # warm
            label = "auth + rate limit + audit on" if on else "security off"
            rows.append((f"GET /v1/models req/s, concurrency {c}, {label}", *_pairs(old, new)))
            print(rows[-1], flush=True)
        finally:
            for proc, _, _ in gateways:
                proc.terminate()
                proc.wait(10)
    return rows


def _guarded_gateway(checkout: Path, on: bool) -> tuple[Any, int, dict[str, str]]:
    """A gateway of `checkout` with a key that has a requests/minute limit (never hit)."""
    from dify_serving.security.db import database_url
    from dify_serving.security.keys import KeyStore
    from dify_serving.security.secrets import key_pepper

    home = Path(tempfile.mkdtemp(prefix="dify-compare-sec-"))
    keys = KeyStore(database_url(home, None, "keys"), key_pepper(home))
    rate_limit = {"requests_per_minute": 1_000_000_000}
    key = keys.create("bench", ["inference"], rate_limit=rate_limit).key
    keys.close()
    env = {**os.environ, "DIFY_MIRROR_KEY_PEPPER": key_pepper(home).decode()}
    proc, port = _gateway(checkout, home, on, env)
    return proc, port, {"Authorization": f"Bearer {key}"} if on else {}


def _guard_rate(gateway: tuple[Any, int, dict[str, str]], requests: int, c: int) -> float:
    _, port, headers = gateway
    load.HEADERS.clear()
    load.HEADERS.update(headers)
    return _requests_per_s(f"http://127.0.0.1:{port}", "/v1/models", lambda i: None, requests, c)


if __name__ == "__main__":
    figures = main(Path(sys.argv[1]).resolve())
    print("| figure | old | new | new/old (median of rounds) |")
    print("|---|---|---|---|")
    for name, o, n, ratio in figures:
        print(f"| {name} | {o:.0f} | {n:.0f} | {ratio:.2f}× |")
