"""One real local stack (Ray + Serve + gateway + models) for the whole test session."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import tiny_models

from dify_serving.local import LocalStack
from dify_serving.manifests import DesiredState, parse_documents
from dify_serving.settings import Settings

#: The admin key every stack the tests start is bootstrapped with (Ray workers and
#: subprocesses inherit the environment).
#: The session stack keeps Ray Serve's own 4 MiB limit between deployments (the local
#: stack raises it to 64 MiB), so the tests reach the gateway's 413 for what would not fit.
os.environ.setdefault("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(4 * 1024 * 1024))
API_KEY = os.environ.setdefault(
    "DIFY_MIRROR_BOOTSTRAP_KEY", "dm_testadmin001_T3stS3cretT3stS3cretT3stS3cretAB"
)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def require_service(name: str, probe: Callable[[], object]) -> None:
    """Skip when a local service is down; under CI (`CI=true`) that is a failure instead."""
    try:
        probe()
    except Exception as exc:
        message = f"{name} is not reachable at its local address: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Whether `predicate` came true within `timeout_s` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_doc(name: str, model_id: str, task: str, **spec: object) -> dict:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": name},
        "spec": {"modelId": model_id, "task": task, "resources": {"cpus": 0.25}, **spec},
    }


def index_doc(name: str, model: str, **spec: object) -> dict:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyIndex",
        "metadata": {"name": name},
        "spec": {"embeddingModel": model, **spec},
    }


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
        ray_num_cpus=2,
        ray_dashboard_port=free_port(),
        model_roots=[str(tiny_dir), str(home / "models")],
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
