"""The OpenAPI document states the auth the guard enforces; /readyz is short and cached.

In-process gateways (no Ray); the Ray dashboard /readyz asks is a small real HTTP server
that counts its calls and can be told to fail.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from stub_http import QuietHandler, StubServer

from dify_serving.gateway import openapi
from dify_serving.gateway.app import create_app
from dify_serving.gateway.policy import rule_for
from dify_serving.gateway.routers import health
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions

_APPS: list[Any] = []


def _app(home: Path, **options: Any) -> Any:
    app = create_app(GatewayState(GatewayOptions(home=str(home), **options)))
    _APPS.append(app)
    return app


@pytest.fixture(autouse=True)
def _close_guards() -> Iterator[None]:
    yield
    while _APPS:
        guard = getattr(_APPS.pop().state, "guard", None)
        if guard is not None:
            guard.close()


# OpenAPI -----------------------------------------------------------------------------------
def test_openapi_declares_the_bearer_scheme_and_the_otp_header(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path)) as client:
        doc = client.get("/openapi.json").json()
        assert client.get("/openapi.json").json() == doc  # built once, secured once
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "dm_<12 id characters>_<secret>",
        "description": "An API key (`dify-mirror keys create`, or the bootstrap key).",
    }
    checked = sensitive = 0
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            rule = rule_for(method.upper(), path)
            headers = [p["name"] for p in op.get("parameters", []) if p["in"] == "header"]
            if rule.public:
                assert "security" not in op, f"{method} {path} is public"
            else:
                assert op["security"] == [{"bearer": []}], f"{method} {path}"
                checked += 1
            assert (openapi.OTP_HEADER in headers) == rule.sensitive, f"{method} {path}"
            sensitive += rule.sensitive
    assert checked > 10 and sensitive >= 3
    load = doc["paths"]["/v1/models/load"]["post"]
    otp = next(p for p in load["parameters"] if p["name"] == "X-Dify-OTP")
    assert otp["required"] is False and otp["schema"]["pattern"] == "^[0-9]{6}$"
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_docs_are_served_from_the_gateways_own_assets(tmp_path: Path) -> None:
    client = TestClient(_app(tmp_path))
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn." not in page.text
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    for name in ("swagger-editor.js", "..%2F__init__.py", "LICENSE"):
        assert client.get(f"/docs/assets/{name}").status_code == 404


def test_without_security_the_document_declares_none(tmp_path: Path) -> None:
    app = _app(tmp_path, security=SecurityOptions(enabled=False))
    with TestClient(app) as client:
        doc = client.get("/openapi.json").json()
    assert "securitySchemes" not in doc.get("components", {})
    assert "security" not in doc["paths"]["/v1/models"]["get"]


# /readyz -----------------------------------------------------------------------------------
class Dashboard(StubServer):
    """A stand-in Ray dashboard on a real port: counts GETs; `mode` picks the answer."""

    def __init__(self) -> None:
        self.calls = 0
        self.mode = "ok"
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                outer.calls += 1
                if outer.mode == "ok":
                    status, body = 200, json.dumps({"applications": {}}).encode()
                elif outer.mode == "garbage":
                    status, body = 200, b"<html>not json</html>"
                else:
                    status, body = (
                        500,
                        b"Traceback (most recent call last):\nSecretError: pw=hunter2",
                    )
                self.reply(status, body)

        super().__init__(Handler)


@pytest.fixture()
def dashboard() -> Iterator[Dashboard]:
    d = Dashboard()
    yield d
    d.close()


def _ready_app(home: Path, url: str) -> Any:
    app = _app(home, dashboard_url=url)
    app.state.gateway.status.cluster_gpus = 0.0  # known: no Ray client call
    return app


def test_readyz_asks_the_dashboard_once_for_many_probes(
    tmp_path: Path, dashboard: Dashboard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "READY_CACHE_S", 3600.0)  # no timing in the assertion
    app = _ready_app(tmp_path, dashboard.url)
    with TestClient(app) as client:
        replies = [client.get("/readyz") for _ in range(25)]
    assert {r.status_code for r in replies} == {200}
    assert dashboard.calls == 1
    assert replies[0].json() == {"status": "ready", "models": {"total": 0, "ready": 0}}

    async def concurrent() -> list[int]:
        fresh = _ready_app(tmp_path, dashboard.url)
        transport = httpx.ASGITransport(app=fresh)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            got = await asyncio.gather(*(http.get("/readyz") for _ in range(25)))
        return [r.status_code for r in got]

    assert set(asyncio.run(concurrent())) == {200}
    assert dashboard.calls == 2  # 25 probes at once: one more call, not 25
    monkeypatch.setattr(health, "READY_CACHE_S", 0.0)  # expired: asked again
    with TestClient(app) as client:
        client.get("/readyz")
    assert dashboard.calls == 3


@pytest.mark.parametrize(("mode", "reason"), [("error", "ray_unavailable"), ("garbage", None)])
def test_readyz_failure_is_a_short_code_never_the_exception(
    tmp_path: Path, dashboard: Dashboard, mode: str, reason: str | None
) -> None:
    dashboard.mode = mode
    with TestClient(_ready_app(tmp_path, dashboard.url)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["reason"] == (reason or "status_unavailable")
    for leak in ("Traceback", "hunter2", "127.0.0.1", "HTTP 500", "json", "Expecting"):
        assert leak not in r.text


def test_readyz_with_the_dashboard_gone(tmp_path: Path, dashboard: Dashboard) -> None:
    url = dashboard.url
    dashboard.close()
    with TestClient(_ready_app(tmp_path, url)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable", "reason": "ray_unavailable"}


def test_readyz_reads_the_refresh_loop_without_calling_the_dashboard(
    tmp_path: Path, dashboard: Dashboard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the replica's refresh loop running, probes read its last outcome."""
    app = _ready_app(tmp_path, dashboard.url)
    state: GatewayState = app.state.gateway

    async def until(done: Any) -> None:
        for _ in range(500):
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the refresh loop did not get there")

    async def run() -> tuple[list[httpx.Response], int, httpx.Response, httpx.Response]:
        state.start()
        await until(lambda: state.status.refreshed_at is not None)
        before = dashboard.calls
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            ready = await asyncio.gather(*(http.get("/readyz") for _ in range(25)))
            asked = dashboard.calls - before
            monkeypatch.setattr(health, "STALE_S", 0.0)  # the last success is too old
            stale = await http.get("/readyz")
            monkeypatch.setattr(health, "STALE_S", 3600.0)
            dashboard.mode = "error"
            state.status.refresh_soon()
            await until(lambda: state.status.refresh_failure is not None)
            failed = await http.get("/readyz")
        return ready, asked, stale, failed

    ready, asked, stale, failed = asyncio.run(run())
    assert {r.status_code for r in ready} == {200} and asked == 0
    assert stale.status_code == 503
    assert stale.json() == {"status": "unavailable", "reason": "status_stale"}
    assert failed.status_code == 503
    assert failed.json() == {"status": "unavailable", "reason": "ray_unavailable"}
    assert "hunter2" not in failed.text
