"""Model management over HTTP: status, load, unload, failures that stay contained."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from dify_serving.engines import progress
from dify_serving.engines.base import cpu_has_bf16


def wait_phase(client: httpx.Client, name: str, phases: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        models = {m["name"]: m for m in client.get("/v1/models/status").json()["models"]}
        if name in models and models[name]["phase"] in phases:
            return models[name]
        assert time.monotonic() < deadline, f"{name} never reached {phases}: {models.get(name)}"
        time.sleep(0.5)


def test_status_reports_device_precision_and_memory(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models/status").json()["models"]}
    llm = models["demo-llm"]
    assert llm["phase"] == "Ready" and llm["ready_replicas"] == 1 == llm["desired_replicas"]
    assert llm["device"] == "cpu" and llm["precision"] == "fp32"
    assert llm["resident_memory_bytes"] > 10_000_000 and llm["parameters"] > 1_000_000
    assert llm["load_progress"] == 1.0 and llm["gpus"] == []
    # engine auto: OpenVINO GenAI's continuous batching generates on CPU, seeded or not
    assert llm["engine"] == "openvino" and llm["engine_note"] is None
    minilm = models["minilm"]  # engine auto: OpenVINO runs embeddings on CPU
    assert (minilm["engine"], minilm["precision"], minilm["parameters"]) == (
        "openvino",
        "fp32",
        22_713_216,
    )
    assert models["sentiment"]["engine"] == "openvino"  # text-classification too
    broken = models["broken"]
    assert broken["phase"] == "Failed" and "config.json not found" in broken["message"]


def test_list_models_has_phase(client: httpx.Client) -> None:
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["minilm"]["task"] == "feature-extraction"
    assert data["broken"]["phase"] == "Failed"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"name": "x", "modelId": "m", "device": "cpu", "precision": "fp16"}, "bf16"),
        ({"name": "x", "modelId": "m", "task": "dancing"}, "task"),
        ({"name": "Bad_Name", "modelId": "m"}, "name"),
        ({"name": "x"}, "modelId"),
    ],
)
def test_load_refuses_invalid_specs(client: httpx.Client, body: dict, needle: str) -> None:
    r = client.post("/v1/models/load", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]


def test_short_body_derives_the_name_and_fails_without_gpu(client: httpx.Client) -> None:
    r = client.post(
        "/v1/models/load",
        json={"model_id": "ernie-3.5-turbo", "device": "cuda:0", "precision": "fp16"},
    )
    assert r.status_code == 202, r.text
    assert r.json()["name"] == "ernie-3-5-turbo"
    try:
        status = wait_phase(client, "ernie-3-5-turbo", {"Failed"}, timeout=30)
        assert "GPU" in status["message"]
    finally:
        assert client.post("/v1/models/unload", json={"name": "ernie-3-5-turbo"}).status_code == 202


def test_unload_unknown_is_404(client: httpx.Client) -> None:
    r = client.post("/v1/models/unload", json={"name": "never-loaded"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_load_serve_unload_cycle(client: httpx.Client, stack: Any) -> None:
    r = client.post(
        "/v1/models/load",
        json={
            "name": "minilm-bf16",
            "modelId": "sentence-transformers/all-MiniLM-L6-v2",
            "task": "feature-extraction",
            "precision": "bf16",
            "resources": {"cpus": 0.25},
        },
    )
    assert r.status_code == 202, r.text
    status = wait_phase(client, "minilm-bf16", {"Ready", "Failed"})
    assert status["phase"] == "Ready", status
    if cpu_has_bf16():
        assert status["precision"] == "bf16"
    else:  # never silently slow: fp32, and the status says why
        assert status["precision"] == "fp32"
        assert status["engine_note"] == "bf16 asked, but this CPU has no bf16 support: running fp32"
    r = client.post("/v1/embeddings", json={"model": "minilm-bf16", "input": "hello"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    assert client.post("/v1/models/unload", json={"name": "minilm-bf16"}).status_code == 202
    r = client.post("/v1/embeddings", json={"model": "minilm-bf16", "input": "hello"})
    assert r.status_code == 404
    deadline = time.monotonic() + 60
    while "model-minilm-bf16" in stack.dashboard.get_applications()["applications"]:
        assert time.monotonic() < deadline, "Serve app not removed"
        time.sleep(0.5)
    # the other models kept serving throughout
    assert client.post("/v1/inference", json={"model": "minilm", "input": "x"}).status_code == 200


def test_unload_while_streaming_ends_streams_with_an_error(client: httpx.Client) -> None:
    r = client.post(
        "/v1/models/load",
        json={
            "name": "llm-2",
            "modelId": "builtin:demo-llm",
            "resources": {"cpus": 0.25},
            "generation": {"maxNewTokens": 1500, "maxContextTokens": 2048},
        },
    )
    assert r.status_code == 202, r.text
    assert wait_phase(client, "llm-2", {"Ready", "Failed"})["phase"] == "Ready"
    lines: list[str] = []
    started = threading.Event()

    def consume() -> None:
        with client.stream(
            "POST",
            "/v1/inference",
            json={
                "model": "llm-2",
                "prompt": "go on",
                "max_tokens": 1500,
                "temperature": 0,
                "stream": True,
            },
        ) as response:
            for line in response.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(60)
    t0 = time.monotonic()
    assert client.post("/v1/models/unload", json={"name": "llm-2"}).status_code == 202
    reader.join(30)
    assert not reader.is_alive(), "stream hung after unload"
    assert time.monotonic() - t0 < 30
    assert "event: error" in lines
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    assert any("unloaded" in line for line in lines)


def test_load_stages_travel_through_rays_key_value_store(stack: Any) -> None:
    """What a loading replica publishes (engines/progress.py) the gateway reads back, from
    any process of the cluster; a finished load clears it, and the stage of a model that
    is gone (its replica stopped mid-load) is deleted when the stages are read."""
    progress.publish_stage("ghost", "converting to CTranslate2")
    assert progress.loading_stages({"ghost"})["ghost"] == "converting to CTranslate2"
    progress.clear_stage("ghost")
    assert "ghost" not in progress.loading_stages({"ghost"})
    progress.publish_stage("gone", "converting to OpenVINO IR")
    assert progress.loading_stages({"demo-llm"}).get("gone") is None
    assert "gone" not in progress.loading_stages({"gone"})  # deleted by the read before
