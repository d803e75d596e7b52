"""`GET /v1/metrics` of an in-process gateway: what it counts, who may scrape it, formats.

A real Prometheus scraping the running stack, and the alert rules under `promtool`, are
`tests/stack/test_prometheus.py` and `tests/unit/test_alert_rules.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from gateways import close_all, gateway, new_key, seed_support_and_other
from support import AUTH


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    seed_support_and_other(tmp_path)
    yield gateway(tmp_path)
    close_all()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition (0 when it is absent)."""
    for line in text.splitlines():
        matched = re.fullmatch(re.escape(name) + r"(?:\{(.*)\})? (\S+)", line)
        if matched is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', matched.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(matched.group(2))
    return 0.0


def scrape(client: TestClient) -> str:
    r = client.get("/v1/metrics", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return r.text


def test_requests_latency_errors_and_refusals_are_counted(client: TestClient) -> None:
    state = client.app.state.gateway  # type: ignore[attr-defined]
    state.status.models["support-llm"] = {"phase": "Loading"}
    state.status.models["other-llm"] = {"phase": "Ready"}
    before = scrape(client)
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/tasks/task-0123456789abcdef01234567", headers=AUTH).status_code == 404
    client.get("/v1/no/such/route/" + "x" * 50, headers=AUTH)
    after = scrape(client)

    def grew(name: str, by: float = 1.0, **labels: str) -> None:
        assert sample(after, name, **labels) - sample(before, name, **labels) == by, (
            name,
            labels,
        )

    grew("dify_requests_total", 1, route="/v1/models", method="GET", status="200")
    grew("dify_requests_total", 1, route="/v1/models", method="GET", status="401")
    grew("dify_requests_total", 1, route="/v1/tasks/{task_id}", method="GET", status="404")
    grew("dify_requests_total", 1, route="(unmatched)", method="GET", status="404")
    grew("dify_request_duration_seconds_count", 2, route="/v1/models", method="GET")
    grew("dify_errors_total", 1, code="unauthorized")
    grew("dify_errors_total", 1, code="task_not_found")
    grew("dify_refusals_total", 1, code="unauthorized")
    assert 'le="0.5"' in after  # buckets that resolve P99 around 500 ms
    assert "x" * 50 not in after and "dm_" not in after  # no path, no key as a label
    assert sample(after, "dify_model_ready", model="other-llm", phase="Ready") == 1.0
    assert 'dify_model_ready{model="support-llm",phase="Loading"} 0.0' in after


def test_scraping_needs_metrics_read(client: TestClient, tmp_path: Path) -> None:
    reader = new_key(client, scopes=["metrics:read"])["key"]
    other = new_key(client, scopes=["inference"])["key"]
    r = client.get("/v1/metrics", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 403 and "metrics:read" in r.json()["error"]["message"]
    assert client.get("/v1/metrics").status_code == 401
    assert (
        client.get("/v1/metrics", headers={"Authorization": f"Bearer {reader}"}).status_code == 200
    )


def test_public_metrics_need_no_key_and_openmetrics_on_accept(tmp_path: Path) -> None:
    seed_support_and_other(tmp_path)
    try:
        public = gateway(tmp_path, metrics_public=True)
        r = public.get("/v1/metrics", headers={"Accept": "application/openmetrics-text"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.rstrip().endswith("# EOF")
        assert "dify_requests_created" in r.text or "dify_requests_total" in r.text
        assert public.get("/v1/models").status_code == 401  # only the metrics are open
    finally:
        close_all()


def test_task_queue_depth_and_outcomes_once_tasks_are_used(client: TestClient) -> None:
    assert "dify_task_queue_depth" not in scrape(client)
    body = {"model": "other-llm", "prompt": "x"}
    for _ in range(3):
        assert client.post("/v1/inference/async", json=body, headers=AUTH).status_code == 202
    text = scrape(client)
    assert sample(text, "dify_task_queue_depth", queue="dify-tasks") == 3.0
    assert sample(text, "dify_tasks", status="PENDING") == 3.0
