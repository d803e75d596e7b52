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


def scrape(client: httpx.Client) -> str:
    r = client.get("/v1/metrics")
    assert r.status_code == 200, r.text
    return r.text


def series(text: str, name: str, **labels: str) -> dict[str, float]:
    """`replica` → value of each sample of `name` with `labels` in an exposition."""
    out = {}
    for line in text.splitlines():
        matched = re.fullmatch(re.escape(name) + r"\{(.*)\} (\S+)", line)
        if matched is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', matched.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            out[found.get("replica", "")] = float(matched.group(2))
    return out


def test_one_scrape_shows_every_replica(client: httpx.Client) -> None:
    """Model and index replicas push their figures to the hub; one scrape of the gateway
    shows them all, each series with its replica, labels only names the catalog knows."""
    greedy = {"model": "demo-llm", "prompt": "every replica", "max_tokens": 4, "temperature": 0.5}
    assert client.post("/v1/inference", json=greedy).status_code == 200
    with client.stream("POST", "/v1/inference", json={**greedy, "stream": True}) as r:
        assert r.status_code == 200
        r.read()
    assert client.post("/v1/embeddings", json={"model": "minilm", "input": ["a b c"]}).is_success
    search = {"index": "kb", "query": "replica figures", "top_k": 1}
    assert client.post("/v1/data/search", json=search).status_code == 200
    wanted = [
        ("dify_model_generated_tokens_total", {"model": "demo-llm"}),
        ("dify_model_time_to_first_token_seconds_count", {"model": "demo-llm"}),
        ("dify_model_embedding_inputs_total", {"model": "minilm"}),
        ("dify_model_load_duration_seconds", {"model": "sentiment"}),
        ("dify_model_running_requests", {"model": "demo-llm"}),
        ("dify_index_searches_total", {"index": "kb"}),
        ("dify_index_points", {"index": "kb"}),
        ("dify_requests_total", {"route": "/v1/inference", "model": "demo-llm"}),
    ]

    def all_there() -> bool:
        text = scrape(client)
        return all(series(text, name, **labels) for name, labels in wanted)

    assert wait_for(all_there, 30), [
        (name, labels) for name, labels in wanted if not series(scrape(client), name, **labels)
    ]
    text = scrape(client)
    model_replica = next(iter(series(text, "dify_model_generated_tokens_total", model="demo-llm")))
    gateway_replica = next(iter(series(text, "dify_requests_total", route="/v1/inference")))
    assert model_replica and gateway_replica and model_replica != gateway_replica
    assert "dify_gpu" not in text or shutil.which("nvidia-smi")  # CPU: absent, not zero
    for line in text.splitlines():  # no prompt, no key, no request id as a label
        assert "every replica" not in line and API_KEY not in line
    assert text.count("# TYPE dify_model_generated_tokens_total counter") == 1


def test_a_replaced_replica_starts_new_series(client: httpx.Client) -> None:
    """Kill a model replica: Serve starts another; its series carry a new replica label
    and a later `_created`, and the dead one's series leave the scrape."""
    import ray

    from dify_serving import telemetry
    from dify_serving.render import model_app_name

    body = {"model": "sentiment", "input": "good"}
    assert client.post("/v1/inference", json=body).status_code == 200
    assert wait_for(
        lambda: bool(series(scrape(client), "dify_model_requests_total", model="sentiment")), 30
    )
    before = series(scrape(client), "dify_model_requests_created", model="sentiment")
    (old, created), *_ = before.items()
    actor = ray.get_actor(
        f"SERVE_REPLICA::{model_app_name('sentiment')}#ModelServer#{old}", namespace="serve"
    )
    ray.kill(actor, no_restart=True)

    def replaced() -> bool:
        client.post("/v1/inference", json=body)
        now = series(scrape(client), "dify_model_requests_created", model="sentiment")
        return bool(now) and old not in now

    assert wait_for(replaced, telemetry.EXPIRE_AFTER_S + 120), "the old replica never left"
    after = series(scrape(client), "dify_model_requests_created", model="sentiment")
    assert all(value > created for value in after.values())


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
    with client.stream("POST", "/v1/inference", json={**greedy, "stream": True}) as streamed:
        streamed.read()  # time to first token and per output token are measured on streams
    r = client.post("/v1/inference", json={**greedy, "prompt": "rated"})
    assert r.status_code == 200
    rated = client.post(
        "/v1/models/feedback", json={"request_id": r.headers["x-request-id"], "rating": "up"}
    )
    assert rated.status_code in (200, 201), rated.text
    doc = {"id": "panel-doc", "text": "Panels show what the stack does."}
    assert client.post("/v1/data/upsert", json={"index": "kb", "documents": [doc]}).is_success
    assert client.post("/v1/data/search", json={"index": "kb", "query": "panels"}).is_success
    assert client.post("/v1/embeddings", json={"model": "minilm", "input": ["x"]}).is_success
    gpus = "dify_gpu_" in scrape(client)
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = panel_query(target["expr"])
            if "dify_gpu_" in expr and not gpus:  # a CPU stack: GPU series are absent
                query(prometheus, expr)  # still parses
                continue
            assert wait_for(lambda e=expr: bool(query(prometheus, e)), 30), (panel["title"], expr)
