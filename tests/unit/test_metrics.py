"""`GET /v1/metrics` of an in-process gateway: what it counts, who may scrape it, formats.

A real Prometheus scraping the running stack, and the alert rules under `promtool`, are
`tests/stack/test_prometheus.py` and `tests/unit/test_alert_rules.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    """The sum of the exposition's samples with these labels (0 when there is none): a
    route's requests are split further by model and version."""
    total = 0.0
    for line in text.splitlines():
        matched = re.fullmatch(re.escape(name) + r"(?:\{(.*)\})? (\S+)", line)
        if matched is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', matched.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(matched.group(2))
    return total


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


def test_requests_carry_the_model_and_version_the_data_plane_noted(client: TestClient) -> None:
    from dify_serving.gateway.errors import ApiError

    state = client.app.state.gateway  # type: ignore[attr-defined]

    state.status.models["other-llm"] = {"phase": "Ready"}

    def no_ray(name: str) -> None:  # no Ray here: the call fails once the model is known
        raise ApiError(503, "model_not_ready", "no Ray in this test")

    state.model_replicas.handle = no_ray
    body = {"model": "other-llm", "prompt": "x"}
    unknown = {**body, "model": "nope"}
    before = scrape(client)
    assert client.post("/v1/inference", json=body, headers=AUTH).status_code == 503
    assert client.post("/v1/inference", json=unknown, headers=AUTH).status_code == 404
    text = scrape(client)

    def grew(**labels: str) -> float:
        name = "dify_requests_total"
        return sample(text, name, **labels) - sample(before, name, **labels)

    assert grew(route="/v1/inference", model="other-llm", version="", status="503") == 1
    assert grew(route="/v1/inference", model="", status="404") == 1
    assert 'model="nope"' not in text  # a name the catalog does not know is never a label


def test_a_version_noted_as_name_at_version_is_its_own_label() -> None:
    import asyncio

    from dify_serving.gateway import metrics
    from dify_serving.gateway.notes import note

    async def app(scope: Any, receive: Any, send: Any) -> None:
        note(model="demo-llm@v2")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    labels = ("/v1/inference", "POST", "200", "demo-llm", "v2")
    before = metrics.REQUESTS.labels(*labels)._value.get()
    scope = {"type": "http", "method": "POST", "path": "/v1/inference", "headers": []}
    asyncio.run(metrics.MetricsMiddleware(app)(scope, receive, send))
    assert metrics.REQUESTS.labels(*labels)._value.get() == before + 1


def test_the_audit_writer_is_watched(client: TestClient) -> None:
    text = scrape(client)
    assert "# TYPE dify_audit_pending_entries gauge" in text
    assert "# TYPE dify_audit_dropped_entries_total counter" in text or (
        "# TYPE dify_audit_dropped_entries counter" in text
    )
    assert sample(text, "dify_audit_dropped_entries_total") == 0.0


def test_metrics_switched_off_count_nothing_but_still_answer(tmp_path: Path) -> None:
    from dify_serving.gateway import metrics
    from dify_serving.gateway.app import create_app
    from dify_serving.gateway.state import GatewayState
    from dify_serving.options import GatewayOptions
    from dify_serving.security.secrets import Secrets

    seed_support_and_other(tmp_path)
    options = GatewayOptions(home=str(tmp_path), metrics_enabled=False)
    app = create_app(GatewayState(options), Secrets(tmp_path))
    off = TestClient(app, client=("127.0.0.1", 40000))
    try:
        before = sample(scrape(off), "dify_requests_total", route="/v1/models")
        for _ in range(3):
            assert off.get("/v1/models", headers=AUTH).status_code == 200
        text = scrape(off)
        assert sample(text, "dify_requests_total", route="/v1/models") == before
        assert "dify_model_ready" in text  # what is read at scrape time is still there
        assert metrics.PUSHER.replica  # this process's replica id
    finally:
        app.state.guard.close()
