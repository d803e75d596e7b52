"""Authorization in-process: body-chosen scopes, resource patterns, the policy table tied to
the routes, WebSocket refusal, keys from the CLI. No Ray: the gateway answers from its
desired state, and the few replica calls are refused upstream. Second-factor lockout
and failures per address, with Redis as well, are in `tests/services`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from gateways import audit_rows, close_all, gateway, new_key, seed_support_and_other
from starlette.websockets import WebSocket, WebSocketDisconnect
from support import AUTH

from dify_serving.gateway import policy
from dify_serving.gateway.app import create_app
from dify_serving.gateway.replicas import IndexClient
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    """A state folder whose desired state has support-* and other-* models and indexes."""
    yield seed_support_and_other(tmp_path)
    close_all()


# ---- retrieval needs data:read --------------------------------------------------------------


def test_retrieval_through_chat_completions_needs_data_read(home: Path) -> None:
    client = gateway(home)
    key = new_key(client, scopes=["inference"])
    body = {
        "model": "other-llm",
        "index": "support-kb",
        "messages": [{"role": "user", "content": "what is in the knowledge base?"}],
    }
    r = client.post("/v1/chat/completions", json=body, headers=key["headers"])
    assert r.status_code == 403, r.text
    assert "data:read" in r.json()["error"]["message"]
    row = audit_rows(client, key_id=key["id"])[-1]
    assert (row["route"], row["status"]) == ("/v1/chat/completions", 403)
    assert "data:read" in row["detail"]


# ---- resource patterns ----------------------------------------------------------------------


def test_a_confined_key_sees_and_uses_only_its_models_and_indexes(home: Path) -> None:
    client = gateway(home)
    key = new_key(
        client,
        scopes=["inference", "data:read"],
        models=["support-*"],
        indexes=["support-*"],
    )
    listing = [k for k in client.get("/v1/admin/keys", headers=AUTH).json()["data"]]
    mine = next(k for k in listing if k["id"] == key["id"])
    assert mine["models"] == ["support-*"] and mine["indexes"] == ["support-*"]
    assert next(k for k in listing if k["name"] == "bootstrap")["models"] is None

    models = client.get("/v1/models", headers=key["headers"]).json()["data"]
    assert sorted(m["id"] for m in models) == ["support-embed", "support-llm"]
    local = next(m for m in models if m["id"] == "support-llm")
    assert local["model_id"] is None  # a path on the server: admin only
    assert str(home) not in json.dumps(models)
    admin_view = client.get("/v1/models", headers=AUTH).json()["data"]
    assert len(admin_view) == 3
    assert next(m for m in admin_view if m["id"] == "support-llm")["model_id"].startswith("/")

    state: GatewayState = client.app.state.gateway  # type: ignore[attr-defined]
    from dify_serving.status import model_status

    for name, model in state.catalog.models().items():
        state.status.models[name] = {
            **model_status(name, model.spec, {}),
            "message": f"cannot read {model.spec.model_id}",
        }
    status = client.get("/v1/models/status", headers=key["headers"]).json()["models"]
    assert sorted(s["name"] for s in status) == ["support-embed", "support-llm"]
    assert str(home) not in json.dumps(status)
    indexes = client.get("/v1/indexes", headers=key["headers"]).json()["data"]
    assert [i["name"] for i in indexes] == ["support-kb"]

    refused = [
        ("/v1/inference", {"model": "other-llm", "prompt": "hi"}, "model 'other-llm'"),
        ("/v1/inference", {"model": "no-such", "prompt": "hi"}, "model 'no-such'"),
        ("/v1/embeddings", {"model": "other-llm", "input": "hi"}, "model 'other-llm'"),
        ("/v1/data/search", {"index": "other-kb", "query": "x"}, "index 'other-kb'"),
        ("/v1/data/search", {"index": "gone-kb", "query": "x"}, "index 'gone-kb'"),
    ]
    for path, body, named in refused:
        r = client.post(path, json=body, headers=key["headers"])
        assert r.status_code == 403, (path, body, r.text)
        assert named in r.json()["error"]["message"]
    rows = audit_rows(client, key_id=key["id"], status=403)
    assert any("forbidden: model other-llm" in (r["detail"] or "") for r in rows)
    operator = new_key(client, scopes=["models:admin"], models=["support-*"])
    spec = {"name": "other-new", "modelId": "builtin:demo-llm", "task": "text-generation"}
    for path, body in (("/v1/models/load", spec), ("/v1/models/unload", {"name": "other-llm"})):
        r = client.post(path, json=body, headers=operator["headers"])
        assert r.status_code == 403 and "model 'other-" in r.json()["error"]["message"], r.text
    # an admin key is not confined: a missing index is a plain 404 for it
    r = client.post("/v1/data/search", json={"index": "gone-kb", "query": "x"}, headers=AUTH)
    assert r.status_code == 404


def test_the_default_model_is_the_first_the_key_may_use(home: Path) -> None:
    from dify_serving.gateway.errors import ApiError
    from dify_serving.gateway.notes import REQUEST, RequestContext
    from dify_serving.security.keys import KeyStore

    client = gateway(home)
    state: GatewayState = client.app.state.gateway  # type: ignore[attr-defined]
    store: KeyStore = client.app.state.guard.keys  # type: ignore[attr-defined]
    confined = store.authenticate(store.create("c", ["inference"], models=["support-*"]).key)
    nothing = store.authenticate(store.create("n", ["inference"], models=["nope-*"]).key)
    assert state.model(None).name == "other-llm"  # security off in this call: no key
    token = REQUEST.set(RequestContext(confined))
    try:
        assert state.model(None).name == "support-llm"
    finally:
        REQUEST.reset(token)
    token = REQUEST.set(RequestContext(nothing))
    try:
        with pytest.raises(ApiError) as none:
            state.model(None)
        assert none.value.status == 404
    finally:
        REQUEST.reset(token)


def test_subject_erasure_touches_only_the_indexes_of_a_confined_key(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    erased: list[str] = []

    async def erase(self: IndexClient, name: str, *args: Any) -> int:
        erased.append(name)
        return 1

    monkeypatch.setattr(IndexClient, "delete", erase)  # the replica's side is not tested here
    for name in ("support-kb", "other-kb"):  # both have stored points
        (home / "indexes" / name).mkdir(parents=True)
    client = gateway(home)
    key = new_key(client, scopes=["data:write"], indexes=["support-*"])
    r = client.post("/v1/data/delete", json={"subject_id": "alice"}, headers=key["headers"])
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["removed"]] == ["support-kb"] == erased
    erased.clear()
    r = client.post("/v1/data/delete", json={"subject_id": "alice"}, headers=AUTH)
    assert sorted(x["index"] for x in r.json()["removed"]) == ["other-kb", "support-kb"]
    r = client.post(
        "/v1/data/delete",
        json={"subject_id": "alice", "index": "other-kb"},
        headers=key["headers"],
    )
    assert r.status_code == 403 and "other-kb" in r.json()["error"]["message"]


def test_audit_read_without_admin_sees_only_its_own_rows(home: Path) -> None:
    client = gateway(home)
    reader = new_key(client, scopes=["audit:read", "inference"])
    other = new_key(client, scopes=["inference"])
    client.get("/v1/models", headers=other["headers"])
    client.get("/v1/models", headers=reader["headers"])
    client.app.state.guard.audit.flush()  # type: ignore[attr-defined]
    rows = client.get("/v1/audit/logs", headers=reader["headers"]).json()["data"]
    assert rows and {r["key_id"] for r in rows} == {reader["id"]}
    r = client.get("/v1/audit/logs", params={"key_id": other["id"]}, headers=reader["headers"])
    assert r.status_code == 403 and "its own audit rows" in r.json()["error"]["message"]
    export = client.get("/v1/audit/export", headers=reader["headers"])
    assert export.status_code == 200, export.text
    exported = [json.loads(line) for line in export.text.splitlines()]
    assert exported and {r["key_id"] for r in exported} == {reader["id"]}
    every = client.get("/v1/audit/logs", headers=AUTH).json()["data"]
    assert {reader["id"], other["id"]} <= {r["key_id"] for r in every}


# ---- the policy table and the routes --------------------------------------------------------


def test_every_v1_route_declares_its_rule_or_the_app_is_not_built(tmp_path: Path) -> None:
    """The rule lives at the route (`policy.needs`): a `/v1` route without one stops
    `create_app`, and the table the guard reads is exactly the routes' declarations."""
    from fastapi import APIRouter

    from dify_serving.gateway import routers

    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    app = create_app(GatewayState(options))  # every module on
    routes = [
        (method, str(route.path))
        for route in iter_route_contexts(app.routes)
        for method in (route.methods or ())
        if str(route.path).startswith("/v1")
    ]
    assert any(path == "/v1/chat/completions" for _, path in routes)
    for method, path in routes:
        rule = policy.rule_for(method, path.replace("{key_id}", "k1"))
        assert rule.template == path and not rule.public and rule.scopes, (method, path)
    assert policy.rule_for("POST", "/v1/data/delete").sensitive
    assert policy.rule_for("POST", "/v1/chat").scopes == ("inference", "data:read")
    assert policy.rule_for("GET", "/healthz").public

    rogue = APIRouter(prefix="/v1")

    @rogue.get("/teleport")
    async def teleport() -> dict[str, str]:
        return {}

    original = routers.register

    def with_rogue(app: Any, modules: list[str]) -> None:
        original(app, modules)
        app.include_router(rogue)

    routers.register = with_rogue  # type: ignore[assignment]
    try:
        with pytest.raises(policy.MissingRule, match="/v1/teleport"):
            create_app(GatewayState(options))
    finally:
        routers.register = original  # type: ignore[assignment]


def test_websockets_are_refused(home: Path) -> None:
    client = gateway(home)
    app = client.app

    @app.websocket("/v1/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("unguarded")

    for path in ("/v1/echo", "/anything"):
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path) as ws:
            ws.receive_text()
        assert refused.value.code == 1008
    rows = audit_rows(client, route="/v1/echo")
    assert rows and rows[0]["status"] == 403 and rows[0]["method"] == "WEBSOCKET"


def test_cli_creates_keys_confined_to_patterns(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFY_MIRROR_HOME": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dify_serving.cli", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = cli(
        "create", "--name", "t", "--scopes", "inference", "--models", "support-*,demo-llm"
    )
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["id"]
    listed = next(line for line in cli("list").stdout.splitlines() if line.startswith(key_id))
    assert "models=demo-llm,support-*" in listed and "indexes=" not in listed
    bad = cli("create", "--name", "t", "--scopes", "inference", "--indexes", "../etc")
    assert bad.returncode == 2 and "'../etc'" in bad.stderr
