"""One real local stack (Ray + Serve + gateway + tiny models) for the whole session.

The `stack` fixture starts it once, applies the session's models and indexes and waits
until the gateway agrees they settled; `client` and `base_url` reach it over real HTTP.
Tests that start a Ray of their own (`dify-mirror serve`, `serve.run`) are here too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tiny_models
from support import AUTH, free_port, index_doc, model_doc

from dify_serving.local import LocalStack
from dify_serving.manifests import DesiredState, parse_documents
from dify_serving.settings import Settings


def pytest_itemcollected(item: pytest.Item) -> None:
    """Called through this folder's hooks only: the folder is the marker."""
    item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tiny_models.text_classifier(root / "clf")
    tiny_models.image_classifier(root / "vit")
    tiny_models.captioner(root / "cap")
    return root


def session_state(tiny_dir: Path) -> DesiredState:
    return parse_documents(
        [
            model_doc(
                "demo-llm",
                "builtin:demo-llm",
                "text-generation",
                generation={"maxNewTokens": 64, "temperature": 0.7, "maxContextTokens": 256},
            ),
            model_doc("minilm", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction"),
            model_doc("sentiment", str(tiny_dir / "clf"), "text-classification"),
            model_doc("vit", str(tiny_dir / "vit"), "image-classification"),
            model_doc("captioner", str(tiny_dir / "cap"), "image-to-text"),
            model_doc("broken", str(tiny_dir / "no-weights"), "text-generation"),
            index_doc(
                "kb",
                "minilm",
                chunking={"maxTokens": 64, "overlap": 8},
                filterableFields=["lang", "year"],
            ),
            index_doc("notes", "minilm"),
            index_doc("orphan", "no-such-model"),
        ]
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("home")
    settings = Settings(
        home=home,
        port=free_port(),
        grpc_port=free_port(),
        ray_num_cpus=2,
        ray_dashboard_port=free_port(),
        model_roots=[str(tiny_dir), str(home / "models")],
        task_concurrency=4,  # a queue forms: tests/stack/test_tasks_api.py cancels in it
    )
    local = LocalStack(settings, object_store_memory=150 * 1024 * 1024)
    local.start()
    try:
        local.apply(session_state(tiny_dir))
        local.wait(timeout=600)
        _gateway_caught_up(f"http://127.0.0.1:{settings.port}")
        yield local
    finally:
        local.stop()


def _gateway_caught_up(url: str, timeout: float = 120) -> None:
    """Until the gateway answers and its own status cache agrees that models settled
    (it refreshes in the background; `/v1/models/status` refreshes it at once)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(f"{url}/v1/models/status", headers=AUTH, timeout=10)
            phases = [m["phase"] for m in r.json()["models"]] if r.status_code == 200 else []
            if phases and all(p in ("Ready", "Failed") for p in phases):
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the gateway never caught up with Serve"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def base_url(stack: LocalStack) -> str:
    return f"http://127.0.0.1:{stack.settings.port}"


@pytest.fixture()
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120, headers=AUTH) as c:
        yield c
