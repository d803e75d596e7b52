"""A real Prometheus (Debian's `prometheus` package) scrapes the running stack with the
documented scrape config, and the error-rate alert fires for real.

The rules are the shipped ones with `for:` shortened to 0 s (five minutes is the
production setting; waiting it out here would prove nothing more), evaluated every
second, on a scrape every second.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import API_KEY, AUTH, free_port, require_service, wait_for

OBSERVABILITY = Path(__file__).resolve().parents[2] / "observability"
RULES = OBSERVABILITY / "prometheus"


@pytest.fixture(scope="module")
def prometheus(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")

    def probe() -> None:
        if binary is None:
            raise FileNotFoundError("prometheus is not on PATH (apt-get install prometheus)")

    require_service("Prometheus", probe)
    assert binary is not None
    root = tmp_path_factory.mktemp("prometheus")
    (root / "key").write_text(API_KEY)
    rules = re.sub(r"for: \d+m", "for: 0s", (RULES / "alerts.yaml").read_text())
    (root / "alerts.yaml").write_text(rules)
    target = base_url.removeprefix("http://")
    config = (RULES / "scrape.yaml").read_text()
    config = config.replace("/etc/prometheus/dify-metrics-key", str(root / "key"))
    config = config.replace('"dify-mirror-gateway:8080"', f'"{target}"')
    config = "global: {scrape_interval: 1s, evaluation_interval: 1s}\n" + config
    (root / "prometheus.yml").write_text(config)
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _ready(url), 60), "prometheus did not start"
        yield url
    finally:
        process.terminate()
        process.wait(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_the_gateway_with_a_key(prometheus: str, client: httpx.Client) -> None:
    for _ in range(5):
        assert client.get("/v1/models").status_code == 200
    assert wait_for(lambda: bool(query(prometheus, 'up{job="dify-mirror"} == 1')), 30)
    assert wait_for(
        lambda: bool(query(prometheus, 'dify_requests_total{route="/v1/models",status="200"}')),
        30,
    )
    latency = (
        "histogram_quantile(0.99, sum by (le) (rate(dify_request_duration_seconds_bucket[1m])))"
    )
    assert wait_for(lambda: bool(query(prometheus, latency)), 30)
    ready = query(prometheus, "dify_model_ready")
    assert {r["metric"]["model"] for r in ready} >= {"demo-llm", "broken"}


def test_the_error_rate_alert_fires_for_real(prometheus: str, client: httpx.Client) -> None:
    def firing() -> bool:
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return any(
            a["labels"]["alertname"] == "DifyErrorRateHigh" and a["state"] == "firing"
            for a in alerts
        )

    assert not firing()
    deadline = time.monotonic() + 90
    while not firing():  # requests to a model that failed to load: 503 each
        assert time.monotonic() < deadline, "the alert never fired"
        for _ in range(10):
            r = client.post("/v1/inference", json={"model": "broken", "prompt": "x"}, headers=AUTH)
            assert r.status_code == 503
        time.sleep(0.5)
    ratio = query(prometheus, "dify:error_ratio:rate5m")
    assert ratio and float(ratio[0]["value"][1]) > 0.01


def panel_query(expr: str) -> str:
    """A dashboard panel's expression as Grafana would send it for one job and a 1 m rate."""
    return expr.replace("$__rate_interval", "1m").replace('job=~"$job"', 'job=~".+"')


def test_every_dashboard_panel_parses_and_shows_data(prometheus: str, client: httpx.Client) -> None:
    """Traffic of every kind a panel shows, then every panel's query against Prometheus."""
    import json

    dashboard = json.loads((OBSERVABILITY / "grafana" / "dify-mirror.json").read_text())
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job"} <= names
    greedy = {"model": "demo-llm", "prompt": "panel", "max_tokens": 4, "temperature": 0}
    for _ in range(3):
        assert client.post("/v1/inference", json=greedy).status_code == 200  # miss, hit, hit
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    client.post("/v1/inference", json={"model": "broken", "prompt": "x"})
    r = client.post("/v1/inference/async", json={"model": "demo-llm", "prompt": "q"})
    assert r.status_code == 202
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = panel_query(target["expr"])
            assert wait_for(lambda e=expr: bool(query(prometheus, e)), 30), (panel["title"], expr)
