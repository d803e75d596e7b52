"""Docs and health over real HTTP against the real stack (switching modules off: unit)."""

from __future__ import annotations

import httpx


def test_openapi_describes_every_route(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/v1/models",
        "/v1/models/status",
        "/v1/models/load",
        "/v1/models/unload",
        "/v1/inference",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/healthz",
        "/readyz",
    } <= paths
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert op.get("summary"), f"{path} has no summary"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()  # public: counts, never names
    assert ready["status"] == "ready" and ready["models"]["ready"] >= 1
    assert "demo-llm" not in str(ready)
