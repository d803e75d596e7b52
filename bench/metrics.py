"""What metrics cost: the gateway with its request metrics on against off, and a scrape.

Overhead: two gateway processes (the app the Serve replica builds, on uvicorn like the
direct ingress), both with security on, one with `DIFY_MIRROR_METRICS_ENABLED` (the
`metrics_enabled` option) off, take turns under the same closed-loop load on the cheap
`GET /v1/models` (`bench/onoff.py`). Ray is not involved: the route answers from the
gateway's state.

Scrape: `GET /v1/metrics` on the running stack (three models, two indexes, each replica
pushing its figures to the hub) after traffic to every one of them, so every family is
there; the median and p95 of sequential scrapes, and the samples one holds.

`python -m bench.metrics serve HOME PORT on|off` runs one such gateway.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import load, onoff

SCRAPES = 50
TARGET = 0.95


def serve(home: str, port: int, on: bool) -> None:
    import uvicorn

    from dify_serving.gateway.app import create_app
    from dify_serving.gateway.state import GatewayState
    from dify_serving.options import GatewayOptions

    app = create_app(GatewayState(GatewayOptions(home=home, metrics_enabled=on)))
    uvicorn.run(
        app, host="127.0.0.1", port=port, access_log=False, log_level="warning", proxy_headers=False
    )


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def overhead_rows(port_on: int, port_off: int) -> list[tuple[str, str, str, str]]:
    from dify_serving.security.db import database_url
    from dify_serving.security.keys import KeyStore
    from dify_serving.security.secrets import key_pepper

    root = Path(tempfile.mkdtemp(prefix="dify-bench-metrics-"))
    keys = {}
    for name in ("on", "off"):  # each gateway its own home (audit, keys), the same pepper
        home = root / name
        home.mkdir()
        store = KeyStore(database_url(home, None, "keys"), key_pepper(root))
        keys[name] = store.create("bench", ["inference"]).key
        store.close()
    env = {**os.environ, "DIFY_MIRROR_KEY_PEPPER": key_pepper(root).decode()}
    on = onoff.start("bench.metrics", root / "on", port_on, True, env, _bearer(keys["on"]))
    off = onoff.start("bench.metrics", root / "off", port_off, False, env, _bearer(keys["off"]))
    on_rate, off_rate = onoff.medians(on, off)
    ratio = on_rate / off_rate
    return [
        (
            f"metrics: GET /v1/models req/s, concurrency {onoff.CONCURRENCY}, request metrics on",
            f"{on_rate:.0f}",
            f"the same gateway with metrics off {off_rate:.0f}",
            f"{ratio:.2f}× (target ≥ {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})",
        )
    ]


def scrape_rows(
    base: str, models: list[str], indexes: list[str]
) -> list[tuple[str, str, str, str]]:
    """Traffic to each model and index (so each replica has every family), then scrapes."""
    headers = dict(load.HEADERS)
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        for model in models:
            task = client.get("/v1/models").json()
            kinds = {m["name"]: m.get("task") for m in task.get("models", [])}
            if kinds.get(model) == "feature-extraction":
                body = {"model": model, "input": ["metrics bench"]}
                assert client.post("/v1/embeddings", json=body).is_success
            else:
                body = {"model": model, "prompt": "metrics bench", "max_tokens": 4}
                assert client.post("/v1/inference", json=body).is_success
        for index in indexes:
            assert client.post("/v1/data/search", json={"index": index, "query": "x"}).is_success
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:  # until every replica's push is in
            text = client.get("/v1/metrics").text
            seen = all(f'model="{m}"' in text for m in models) and all(
                f'index="{i}"' in text for i in indexes
            )
            if seen and "dify_model_load_duration_seconds" in text:
                break
            time.sleep(0.5)
        times, cheap = [], []
        for _ in range(SCRAPES):  # a scrape, then the cheap route: interleaved
            started = time.perf_counter()
            r = client.get("/v1/metrics")
            times.append(time.perf_counter() - started)
            assert r.status_code == 200
            started = time.perf_counter()
            assert client.get("/v1/models").status_code == 200
            cheap.append(time.perf_counter() - started)
        text = r.text
    samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    replicas = {part.split('"')[1] for part in text.split("replica=")[1:] if part.startswith('"')}
    times.sort()
    p50, p95 = statistics.median(times), times[int(len(times) * 0.95) - 1]
    return [
        (
            f"metrics: scrape of /v1/metrics, {len(models)} models + {len(indexes)} indexes "
            f"({len(replicas)} replicas, {samples} samples, {len(r.content) // 1024} KiB)",
            f"p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms",
            f"GET /v1/models between them: p50 {statistics.median(cheap) * 1000:.1f} ms",
            f"{SCRAPES} sequential scrapes",
        )
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "on")
