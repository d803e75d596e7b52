"""A gateway with a feature on against the same gateway with it off, taking turns.

Two gateway processes (`python -m MODULE serve HOME PORT on|off`: the FastAPI app the
Serve replica builds, on uvicorn like the direct ingress) take turns under the same
closed-loop load on the cheap `GET /v1/models`. Ray is not involved: the route answers
from the gateway's own state, so the difference is what the feature adds.
`bench.security` (the guard) and `bench.metrics` (request metrics) say what differs.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import load

ROUNDS = 5
REQUESTS = 10000
CONCURRENCY = 16


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    #: Sent with every request of the load (a key, or nothing when security is off).
    headers: dict[str, str]


def start(
    module: str, home: Path, port: int, on: bool, env: dict[str, str], headers: dict[str, str]
) -> Gateway:
    """`python -m MODULE serve HOME PORT on|off`, once its `/healthz` answers."""
    command = [sys.executable, "-m", module, "serve", str(home), str(port)]
    proc = subprocess.Popen([*command, "on" if on else "off"], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return Gateway(proc, port, headers)
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not start")


def rate(gateway: Gateway) -> float:
    """`GET /v1/models` requests per second, REQUESTS of them at CONCURRENCY."""
    load.HEADERS.clear()
    load.HEADERS.update(gateway.headers)
    result = asyncio.run(
        load.run(
            f"http://127.0.0.1:{gateway.port}", "/v1/models", lambda i: None, REQUESTS, CONCURRENCY
        )
    )
    assert result.errors == 0, "requests failed"
    return result.requests / result.seconds


def medians(on: Gateway, off: Gateway) -> tuple[float, float]:
    """Median req/s of `on` and of `off` over ROUNDS interleaved rounds (after one warm-up
    of each); both gateways are stopped after, and `load.HEADERS` is as it was."""
    saved = dict(load.HEADERS)
    try:
        rate(on), rate(off)  # warm both
        with_feature, without = [], []
        for _ in range(ROUNDS):  # interleaved, so drift hits both alike
            with_feature.append(rate(on))
            without.append(rate(off))
    finally:
        load.HEADERS.clear()
        load.HEADERS.update(saved)
        for gateway in (on, off):
            gateway.proc.terminate()
            gateway.proc.wait(10)
    return statistics.median(with_feature), statistics.median(without)
