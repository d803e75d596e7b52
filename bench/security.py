"""The guard's cost: a cheap authenticated route with auth + rate limit + audit on vs off.

Two gateway processes (the same FastAPI app the Serve replica builds, on uvicorn like the
direct ingress), one with security on and one with it off, take turns under the same
closed-loop load on `GET /v1/models`. With security on the key has a requests/minute
limit (so the limiter runs on every request) and every request is audited (SQLite, WAL,
batched). Ray is not involved: the route answers from the gateway's own state, so the
figure isolates what the guard adds.

`python -m bench.security serve HOME PORT on|off` runs one such gateway.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import load

ROUNDS = 5
REQUESTS = 10000
CONCURRENCY = 16


def serve(home: str, port: int, on: bool) -> None:
    import uvicorn

    from dify_serving.gateway.app import create_app
    from dify_serving.gateway.state import GatewayState
    from dify_serving.options import GatewayOptions, SecurityOptions

    options = GatewayOptions(home=home, security=SecurityOptions(enabled=on))
    app = create_app(GatewayState(options))
    uvicorn.run(
        app, host="127.0.0.1", port=port, access_log=False, log_level="warning", proxy_headers=False
    )


def _start(home: Path, port: int, on: bool, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.security",
            "serve",
            str(home),
            str(port),
            "on" if on else "off",
        ],
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not start")


def _rate(port: int, headers: dict[str, str]) -> float:
    load.HEADERS.clear()
    load.HEADERS.update(headers)
    result = asyncio.run(
        load.run(f"http://127.0.0.1:{port}", "/v1/models", lambda i: None, REQUESTS, CONCURRENCY)
    )
    assert result.errors == 0, "requests failed"
    return result.requests / result.seconds


def security_rows(free_port: int, other_port: int) -> list[tuple[str, str, str, str]]:
    from dify_serving.security.db import database_url
    from dify_serving.security.keys import KeyStore
    from dify_serving.security.secrets import key_pepper

    home = Path(tempfile.mkdtemp(prefix="dify-bench-sec-"))
    keys = KeyStore(database_url(home, None, "keys"), key_pepper(home))
    key = keys.create("bench", ["inference"], rate_limit={"requests_per_minute": 1_000_000_000}).key
    keys.close()
    env = {**os.environ, "DIFY_MIRROR_KEY_PEPPER": key_pepper(home).decode()}
    on = _start(home, free_port, True, env)
    off = _start(home / "off", other_port, False, env)
    saved = dict(load.HEADERS)
    try:
        auth = {"Authorization": f"Bearer {key}"}
        _rate(free_port, auth), _rate(other_port, {})  # warm both
        with_guard, without = [], []
        for _ in range(ROUNDS):  # interleaved, so drift hits both alike
            with_guard.append(_rate(free_port, auth))
            without.append(_rate(other_port, {}))
    finally:
        load.HEADERS.clear()
        load.HEADERS.update(saved)
        for proc in (on, off):
            proc.terminate()
            proc.wait(10)
    on_rate, off_rate = statistics.median(with_guard), statistics.median(without)
    return [
        (
            f"security: GET /v1/models req/s, concurrency {CONCURRENCY}, "
            "auth + rate limit + audit on",
            f"{on_rate:.0f}",
            f"the same route with them off {off_rate:.0f}",
            f"{on_rate / off_rate:.2f}×",
        )
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "on")
