"""Authorization in-process: body-chosen scopes, resource patterns, the policy table tied to
the routes, WebSocket refusal, second-factor lockout, failures per address. No Ray: the
gateway answers from its desired state, and the few replica calls are refused upstream.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
import redis
import sqlalchemy as sa
from conftest import API_KEY, index_doc, model_doc, require_service
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from dify_serving.gateway import policy
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.manifests import parse_documents
from dify_serving.options import GatewayOptions, SecurityOptions, ServeOptions
from dify_serving.security.secrets import Secrets
from dify_serving.store import LocalStateStore

AUTH = {"Authorization": f"Bearer {API_KEY}"}
REDIS_URL = "redis://127.0.0.1:6379/0"
_APPS: list[Any] = []


def gateway(home: Path, peer: str = "127.0.0.1", redis_url: str | None = None) -> TestClient:
    options = GatewayOptions(home=str(home), security=SecurityOptions(redis=redis_url is not None))
    app = create_app(GatewayState(options), Secrets(home, redis_url=redis_url))
    _APPS.append(app)
    return TestClient(app, client=(peer, 40000), raise_server_exceptions=False)


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    """A state folder whose desired state has support-* and other-* models and indexes."""
    local = str(tmp_path / "models" / "support-llm")
    docs = [
        model_doc("support-llm", local, "text-generation"),
        model_doc("other-llm", "builtin:demo-llm", "text-generation"),
        model_doc("support-embed", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction"),
        index_doc("support-kb", "support-embed"),
        index_doc("other-kb", "support-embed"),
    ]
    LocalStateStore(tmp_path).save(parse_documents(docs), ServeOptions())
    yield tmp_path
    while _APPS:  # each guard has an audit writer process
        guard = getattr(_APPS.pop().state, "guard", None)
        if guard is not None:
            guard.close()


def new_key(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/admin/keys", json={"name": "t", **body}, headers=AUTH)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    created["headers"] = {"Authorization": f"Bearer {created['key']}"}
    return created


def audit_rows(client: TestClient, **filters: Any) -> list[dict[str, Any]]:
    guard = client.app.state.guard  # type: ignore[attr-defined]
    guard.refusals.flush()
    guard.audit.flush()
    rows: list[dict[str, Any]] = guard.audit.query(limit=1000, **filters)[0]
    return rows


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

    for name, model in state.models().items():
        state.statuses[name] = {
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
    from dify_serving.gateway import access
    from dify_serving.gateway.errors import ApiError
    from dify_serving.security.keys import KeyStore

    client = gateway(home)
    state: GatewayState = client.app.state.gateway  # type: ignore[attr-defined]
    store: KeyStore = client.app.state.guard.keys  # type: ignore[attr-defined]
    confined = store.authenticate(store.create("c", ["inference"], models=["support-*"]).key)
    nothing = store.authenticate(store.create("n", ["inference"], models=["nope-*"]).key)
    assert state.model(None).name == "other-llm"  # security off in this call: no key
    token = access.KEY.set(confined)
    try:
        assert state.model(None).name == "support-llm"
    finally:
        access.KEY.reset(token)
    token = access.KEY.set(nothing)
    try:
        with pytest.raises(ApiError) as none:
            state.model(None)
        assert none.value.status == 404
    finally:
        access.KEY.reset(token)


def test_subject_erasure_touches_only_the_indexes_of_a_confined_key(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    erased: list[str] = []

    async def erase(self: GatewayState, name: str, method: str, *args: Any) -> Any:
        assert method == "delete"
        erased.append(name)
        return 1

    monkeypatch.setattr(GatewayState, "call_index", erase)  # the replica's side is not tested here
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


def _gaps_before(routes: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """What `policy.gaps` does, for the table as it was before `gaps` existed."""
    import re

    def shape(path: str) -> str:
        return re.sub(r"\{[^}]+\}", "{}", path)

    served = {(m, shape(p)) for m, p in routes if p.startswith("/v1") and m != "HEAD"}
    ruled = {(m, shape(r.template)) for m, _, r in policy.RULES if r.template.startswith("/v1")}
    return sorted(f"{m} {p}" for m, p in served - ruled), sorted(
        f"{m} {p}" for m, p in ruled - served
    )


def test_every_v1_route_has_one_rule_and_every_rule_a_route(tmp_path: Path) -> None:
    gaps = getattr(policy, "gaps", None) or _gaps_before
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    app = create_app(GatewayState(options))  # every module on
    routes = [
        (method, str(route.path))
        for route in iter_route_contexts(app.routes)
        for method in (route.methods or ())
    ]
    assert any(path == "/v1/chat/completions" for _, path in routes)
    without_rule, without_route = gaps(routes)
    assert without_rule == [], f"routes with no rule in gateway/policy.py: {without_rule}"
    assert without_route == [], f"rules with no route: {without_route}"
    assert gaps([*routes, ("PATCH", "/v1/models")])[0] == ["PATCH /v1/models"]


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


# ---- second factor: lockout after wrong codes -----------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_wrong_codes_lock_the_sensitive_routes_of_a_key(home: Path, backend: str) -> None:
    if backend == "redis":
        require_service("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    client = gateway(home, redis_url=REDIS_URL if backend == "redis" else None)
    key = new_key(client, scopes=["models:admin", "inference"], totp=True)
    try:
        otp = pyotp.TOTP(key["totp_secret"])
        valid = {otp.at(time.time() + 30 * o) for o in (-1, 0, 1, 2)}
        wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)
        body = {"name": "no-such-model"}
        statuses = []
        for _ in range(5):  # the issue: 5 wrong codes lock for 15 minutes
            r = client.post(
                "/v1/models/unload", json=body, headers={**key["headers"], "X-Dify-OTP": wrong}
            )
            statuses.append(r.status_code)
        assert statuses == [401] * 4 + [429]
        assert int(r.headers["retry-after"]) == 900
        r = client.post(
            "/v1/models/unload", json=body, headers={**key["headers"], "X-Dify-OTP": otp.now()}
        )
        assert r.status_code == 429 and "locked" in r.json()["error"]["message"]
        assert 0 < int(r.headers["retry-after"]) <= 900
        assert client.get("/v1/models", headers=key["headers"]).status_code == 200
        details = [row["detail"] or "" for row in audit_rows(client, key_id=key["id"], status=429)]
        assert details[0] == "second factor locked for 900 s after 5 wrong codes"
        assert "locked" in details[1]
    finally:
        if backend == "redis":
            r_client = redis.Redis.from_url(REDIS_URL)
            stale = list(r_client.scan_iter(match=f"dify-mirror:otp:{key['id']}:*"))
            if stale:
                r_client.delete(*stale)
            r_client.close()


# ---- failures before a key is known ---------------------------------------------------------


def _random_key() -> str:
    return f"dm_{uuid.uuid4().hex[:12]}_{uuid.uuid4().hex}{uuid.uuid4().hex}"


class _StoppedClock:
    """A block that never ends while the test looks at it."""

    def __call__(self) -> float:
        return 1000.0


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_an_address_that_keeps_failing_is_refused_before_the_key_store(
    home: Path, backend: str
) -> None:
    from dify_serving.security.failures import AUTH_FAILURE_BURST, AddressFailures

    peer = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    redis_url = None
    if backend == "redis":
        require_service("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
        redis_url = REDIS_URL
    admin = gateway(home)
    fresh = new_key(admin, scopes=["inference"])  # valid, never used from the peer
    client = gateway(home, peer=peer, redis_url=redis_url)
    guard = client.app.state.guard  # type: ignore[attr-defined]
    guard.failures = AddressFailures(guard.limiter, clock=_StoppedClock())
    try:
        assert client.get("/v1/models", headers=AUTH).status_code == 200  # verified here
        queries: list[str] = []
        sa.event.listen(guard.keys.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
        storm = AUTH_FAILURE_BURST + 300
        started = time.monotonic()
        responses = [
            client.get("/v1/models", headers={"Authorization": f"Bearer {_random_key()}"})
            for _ in range(storm)
        ]
        elapsed = time.monotonic() - started
        codes = [r.status_code for r in responses]
        assert codes == [401] * AUTH_FAILURE_BURST + [429] * (storm - AUTH_FAILURE_BURST)
        assert int(responses[-1].headers["retry-after"]) >= 1
        # the key store answered until the budget ran out (one more), then never again
        assert len(queries) == AUTH_FAILURE_BURST + 1
        assert client.get("/v1/models", headers=AUTH).status_code == 200  # known here
        assert client.get("/v1/models", headers=fresh["headers"]).status_code == 429
        assert len(queries) == AUTH_FAILURE_BURST + 1

        refusals = [r for r in audit_rows(client, client_ip=peer) if r["status"] != 200]
        counted = sum(  # a row of its own, or "auth failures: N more in 1s ..."
            int(r["detail"].split()[2]) if r["detail"].startswith("auth failures:") else 1
            for r in refusals
        )
        assert counted == storm + 1
        assert len(refusals) <= 2 * (elapsed + 2)  # at most two rows a second
    finally:
        if redis_url:
            r_client = redis.Redis.from_url(redis_url)
            r_client.delete(f"dm:rl:authfail:{peer}")
            r_client.close()


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
