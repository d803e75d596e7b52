"""Docs, health, and switching modules off."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import AUTH
from fastapi.testclient import TestClient

from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions


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


def test_switched_off_modules_have_no_routes(tmp_path) -> None:
    state = GatewayState(GatewayOptions(modules=["inference"], home=str(tmp_path)))
    with TestClient(create_app(state), headers=AUTH) as http:
        for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/models/load"):
            r = http.post(path, json={})
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert http.get("/v1/models").status_code == 404
        assert "/v1/chat/completions" not in http.get("/openapi.json").json()["paths"]
        r = http.post("/v1/inference", json={"prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_modules_setting_is_validated() -> None:
    import pytest
    from pydantic import ValidationError

    from dify_serving.settings import Settings

    assert Settings(modules="models, inference").modules == ["models", "inference"]
    with pytest.raises(ValidationError, match="unknown module"):
        Settings(modules="models,teleport")


def test_a_model_being_updated_keeps_serving_from_its_running_replicas(tmp_path: Path) -> None:
    from dify_serving.gateway.errors import ApiError

    state = GatewayState(GatewayOptions(home=str(tmp_path)))
    state.statuses["llm"] = {"phase": "Loading", "ready_replicas": 1, "message": "updating"}
    state.require_serving("llm")  # Serve redeploys it, the old replica still answers
    state.statuses["llm"] = {"phase": "Loading", "ready_replicas": 0, "message": "Loading"}
    with pytest.raises(ApiError, match="is loading"):
        state.require_serving("llm")
    state.statuses["llm"] = {"phase": "Failed", "ready_replicas": 1, "message": "bad weights"}
    with pytest.raises(ApiError, match="failed to load"):
        state.require_serving("llm")
