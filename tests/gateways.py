"""In-process gateways with their guard (keys, audit, limits), for tests of any group.

No Ray behind them: a gateway answers from its desired state, and the few calls that
would reach a replica are refused upstream. Each guard runs an audit writer process,
so the fixture that hands out a state folder closes every gateway opened on it
(`close_all`) when its test ends.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from support import AUTH, index_doc, model_doc

from dify_serving.catalog.files import LocalStateStore
from dify_serving.gateway.app import create_app
from dify_serving.gateway.notes import note_text
from dify_serving.gateway.security import SecurityMiddleware
from dify_serving.gateway.state import GatewayState
from dify_serving.manifests import parse_documents
from dify_serving.options import GatewayOptions, SecurityOptions, ServeOptions
from dify_serving.security.secrets import Secrets

_OPEN: list[Any] = []


def gateway(
    home: Path,
    peer: str = "127.0.0.1",
    redis_url: str | None = None,
    dashboard_url: str | None = None,
    **security: Any,
) -> TestClient:
    """A guarded gateway on `home`, seen from `peer`; with `redis_url`, limits live there;
    with `dashboard_url`, changes are applied there; `security` are further
    `SecurityOptions`."""
    options = GatewayOptions(
        home=str(home),
        dashboard_url=dashboard_url,
        security=SecurityOptions(redis=redis_url is not None, **security),
    )
    app = create_app(GatewayState(options), Secrets(home, redis_url=redis_url))
    _OPEN.append(app)
    return TestClient(app, client=(peer, 40000), raise_server_exceptions=False)


def close_all() -> None:
    while _OPEN:
        guard = getattr(_OPEN.pop().state, "guard", None)
        if guard is not None:
            guard.close()


def seed_support_and_other(home: Path) -> Path:
    """A desired state with support-* and other-* models and indexes, for confined keys."""
    local = str(home / "models" / "support-llm")
    docs = [
        model_doc("support-llm", local, "text-generation"),
        model_doc("other-llm", "builtin:demo-llm", "text-generation"),
        model_doc("support-embed", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction"),
        index_doc("support-kb", "support-embed"),
        index_doc("other-kb", "support-embed"),
    ]
    LocalStateStore(home).save(parse_documents(docs), ServeOptions())
    return home


def new_key(client: TestClient, **body: Any) -> dict[str, Any]:
    """A key created through the admin API, with its `headers` ready to send."""
    r = client.post("/v1/admin/keys", json={"name": "t", **body}, headers=AUTH)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    created["headers"] = {"Authorization": f"Bearer {created['key']}"}
    return created


def audit_rows(client: TestClient, **filters: Any) -> list[dict[str, Any]]:
    """The audit rows so far (refusals and entries flushed first)."""
    guard = client.app.state.guard  # type: ignore[attr-defined]
    guard.refusals.flush()
    guard.audit.flush()
    rows: list[dict[str, Any]] = guard.audit.query(limit=1000, **filters)[0]
    return rows


def through_guard(guard: Any, inner: Any, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    """The status of one POST to `path` through `guard`'s middleware, `inner` behind it."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "state": {"request_id": uuid.uuid4().hex},
    }
    asyncio.run(SecurityMiddleware(inner, guard)(scope, receive, send))
    return int(sent[0]["status"])


async def app_noting_text(scope: Any, receive: Any, send: Any) -> None:
    """An app behind the guard that notes a prompt's text, as the inference routes do."""
    note_text("the secret plans of the prompt")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})
