from __future__ import annotations

import httpx


def test_models_come_up(stack, client: httpx.Client) -> None:
    statuses = stack.statuses()
    assert statuses["demo-llm"]["phase"] == "Ready", statuses
    assert statuses["minilm"]["phase"] == "Ready", statuses
    assert statuses["broken"]["phase"] == "Failed"
    r = client.post("/v1/inference", json={"model": "demo-llm", "prompt": "hello", "max_tokens": 8})
    assert r.status_code == 200, r.text
