"""Swagger UI, in real headless Chromium: "Authorize" exists and makes "Try it out" work.

The gateway runs in-process under uvicorn (as `serve_directly` runs it in a replica). It
serves Swagger UI's files itself, so the browser is refused every request that leaves
the gateway: the page must work offline, as in a cluster without outside access.
Chromium is Debian's (`apt-get install chromium`), driven by Playwright; no browser is
downloaded.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from support import API_KEY, free_port, require_service

from dify_serving.gateway.app import create_app, serve_directly
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture()
def gateway_url(tmp_path: Path) -> Iterator[str]:
    app = create_app(GatewayState(GatewayOptions(home=str(tmp_path))))
    port = free_port()
    servers: list[Any] = []

    async def run() -> None:
        others = asyncio.all_tasks()
        server = await serve_directly(app, "127.0.0.1", port)
        serving = asyncio.all_tasks() - others  # uvicorn's task, started by serve_directly
        servers.append(server)
        while not server.should_exit:
            await asyncio.sleep(0.05)
        await asyncio.wait(serving)  # let it close its connections

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield url
    servers[0].should_exit = True
    thread.join(10)
    app.state.guard.close()


def _offline(route: Any, gateway_host: str) -> None:
    """Let requests to the gateway through; refuse everything else (no CDN, no network)."""
    if urlsplit(route.request.url).hostname == gateway_host:
        route.continue_()
    else:
        route.abort()


def _launch() -> Any:
    require_service("Chromium (/usr/bin/chromium)", lambda: CHROMIUM.stat())
    require_service("Playwright", lambda: __import__("playwright.sync_api"))
    from playwright.sync_api import sync_playwright

    manager = sync_playwright().start()
    browser = manager.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )
    return manager, browser


def test_authorize_then_try_it_out_lists_models(gateway_url: str) -> None:
    manager, browser = _launch()
    from playwright.sync_api import expect

    try:
        page = browser.new_page()
        page.route("**/*", lambda route: _offline(route, "127.0.0.1"))
        page.goto(f"{gateway_url}/docs")
        authorize = page.locator("button.authorize").first
        authorize.wait_for(state="visible", timeout=20_000)

        operation = page.locator("#operations-models-list_models_v1_models_get")
        operation.locator(".opblock-summary").click()
        operation.locator("button.try-out__btn").click()
        with page.expect_response(lambda r: r.url.endswith("/v1/models")) as before:
            operation.locator("button.execute").click()
        assert before.value.status == 401  # the guard is on: no key, no list

        authorize.click()
        dialog = page.locator(".dialog-ux")
        dialog.locator("input").first.fill(API_KEY)
        dialog.locator("button.authorize").click()
        dialog.locator("button.btn-done").click()
        with page.expect_response(lambda r: r.url.endswith("/v1/models")) as after:
            operation.locator("button.execute").click()
        response = after.value
        assert response.request.headers["authorization"] == f"Bearer {API_KEY}"
        assert response.status == 200 and response.json()["object"] == "list"
        status = operation.locator(".live-responses-table tr.response .response-col_status")
        expect(status.first).to_have_text(re.compile(r"^\s*200"), timeout=10_000)

        load = page.locator("#operations-models-load_model_v1_models_load_post")
        load.locator(".opblock-summary").click()
        load.locator("button.try-out__btn").click()
        assert load.locator("input[placeholder='X-Dify-OTP']").count() == 1
    finally:
        browser.close()
        manager.stop()
