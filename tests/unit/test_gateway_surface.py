"""Switching modules off, and serving from a model's running replicas, in-process.

Docs and health over real HTTP against the real stack are in `tests/stack`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support import AUTH

from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions


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
        assert "/v1/tasks/{task_id}" in http.get("/openapi.json").json()["paths"]
    # with only data on, tasks (bulk ingestion) are there, async inference is not
    state = GatewayState(GatewayOptions(modules=["data"], home=str(tmp_path)))
    with TestClient(create_app(state), headers=AUTH) as http:
        paths = http.get("/openapi.json").json()["paths"]
        assert "/v1/tasks" in paths and "/v1/inference/async" not in paths
        assert http.post("/v1/inference/async", json={"prompt": "x"}).status_code == 404


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
    state.status.models["llm"] = {"phase": "Loading", "ready_replicas": 1, "message": "updating"}
    state.model_replicas.require_serving("llm")  # Serve redeploys it, the old replica still answers
    state.status.models["llm"] = {"phase": "Loading", "ready_replicas": 0, "message": "Loading"}
    with pytest.raises(ApiError, match="is loading"):
        state.model_replicas.require_serving("llm")
    state.status.models["llm"] = {"phase": "Failed", "ready_replicas": 1, "message": "bad weights"}
    with pytest.raises(ApiError, match="failed to load"):
        state.model_replicas.require_serving("llm")


def test_one_models_readiness_is_200_or_503_with_the_reason(tmp_path: Path) -> None:
    from gateways import close_all, gateway, new_key, seed_support_and_other

    seed_support_and_other(tmp_path)
    try:
        http = gateway(tmp_path)
        state = http.app.state.gateway  # type: ignore[attr-defined]
        state.status.refresh_if_older = _no_refresh
        state.status.models["other-llm"] = {"phase": "Ready"}
        state.status.models["support-llm"] = {"phase": "Loading", "message": "warming up"}
        r = http.get("/v1/models/other-llm/ready", headers=AUTH)
        assert (r.status_code, r.json()) == (
            200,
            {"name": "other-llm", "ready": True, "phase": "Ready"},
        )
        r = http.get("/v1/models/support-llm/ready", headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["reason"] == "warming up" and r.json()["ready"] is False
        state.status.models["support-llm"] = {"phase": "Failed", "message": "bad weights"}
        r = http.get("/v1/models/support-llm/ready", headers=AUTH)
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert http.get("/v1/models/nope/ready", headers=AUTH).status_code == 404
        assert http.get("/v1/models/Bad_Name/ready", headers=AUTH).status_code == 422
        confined = new_key(http, scopes=["inference"], models=["support-*"])["headers"]
        assert http.get("/v1/models/other-llm/ready", headers=confined).status_code == 403
    finally:
        close_all()


async def _no_refresh(age_s: float) -> None:
    """No Ray here: the test sets the statuses itself."""
