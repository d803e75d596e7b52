"""The product on a real cluster (kind), as `make e2e` (e2e/kind.sh) installs it: the
chart, KubeRay, the ingress. Skipped without DIFY_MIRROR_E2E=1; `make test` never runs it.

The examples' custom resources (renamed `e2e-*`, so the chart's own models stay apart)
are created, reach Ready, and answer through the ingress: inference, upsert + search, an
async task, gRPC (the gateway's port 9000 forwarded by kind.sh), /v1/metrics. Deleting
them removes their Serve applications and releases the finalizers.

    DIFY_MIRROR_E2E=1 DIFY_MIRROR_E2E_GATEWAY=http://dify.localtest.me \
    DIFY_MIRROR_E2E_GRPC=127.0.0.1:19000 DIFY_MIRROR_E2E_KEY=dm_... pytest e2e -m e2e
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("DIFY_MIRROR_E2E") != "1",
        reason="needs a Kubernetes cluster (kind): make e2e",
    ),
]

GROUP, VERSION = "difymirror.dev", "v1alpha1"
PLURALS = {"DifyModel": "difymodels", "DifyIndex": "difyindexes"}
NAMESPACE = os.environ.get("DIFY_MIRROR_NAMESPACE", "dify-mirror")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PREFIX = "e2e-"


def _until(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(2)


def _documents() -> list[dict[str, Any]]:
    """quickstart.yaml's objects, renamed (and their references with them)."""
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "quickstart.yaml").read_text()) if d]
    for doc in docs:
        doc["metadata"]["name"] = PREFIX + doc["metadata"]["name"]
        spec = doc["spec"]
        if "embeddingModel" in spec:
            spec["embeddingModel"] = PREFIX + spec["embeddingModel"]
    return docs


@pytest.fixture(scope="module")
def api() -> Any:
    from kubernetes import client, config

    config.load_kube_config()
    return client.CustomObjectsApi()


@pytest.fixture(scope="module")
def gateway() -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {os.environ['DIFY_MIRROR_E2E_KEY']}"}
    with httpx.Client(
        base_url=os.environ["DIFY_MIRROR_E2E_GATEWAY"], headers=headers, timeout=120
    ) as http:
        yield http


@pytest.fixture(scope="module")
def applied(api: Any) -> Iterator[dict[str, dict[str, Any]]]:
    docs = _documents()
    for doc in docs:
        api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURALS[doc["kind"]], doc)
    by_name = {d["metadata"]["name"]: d for d in docs}

    def ready() -> bool:
        phases = [
            api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURALS[d["kind"]], name)
            .get("status", {})
            .get("phase")
            for name, d in by_name.items()
        ]
        return all(p == "Ready" for p in phases)

    _until(ready, 900, "the examples' objects Ready")
    yield by_name
    from kubernetes import client

    for name, doc in by_name.items():  # the last test deleted them, unless it failed
        with contextlib.suppress(client.ApiException):
            api.delete_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURALS[doc["kind"]], name
            )


def test_inference_through_the_ingress(applied: dict, gateway: httpx.Client) -> None:
    answer = gateway.post(
        "/v1/inference",
        json={"model": f"{PREFIX}demo-llm", "prompt": "hi", "max_tokens": 4, "temperature": 0},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1


def test_upsert_then_search(applied: dict, gateway: httpx.Client) -> None:
    index = f"{PREFIX}docs"
    documents = [
        {"id": "refunds", "text": "Refunds are paid within 14 days.", "metadata": {"lang": "en"}},
        {"id": "shipping", "text": "Parcels ship from Rotterdam.", "metadata": {"lang": "en"}},
    ]
    upserted = gateway.post("/v1/data/upsert", json={"index": index, "documents": documents})
    assert upserted.status_code == 200, upserted.text
    found = gateway.post(
        "/v1/data/search", json={"index": index, "query": "how long do refunds take", "top_k": 1}
    )
    assert found.status_code == 200, found.text
    assert found.json()["hits"][0]["document_id"] == "refunds"


def test_an_async_task_finishes(applied: dict, gateway: httpx.Client) -> None:
    submitted = gateway.post(
        "/v1/inference/async",
        json={"model": f"{PREFIX}demo-llm", "prompt": "later", "max_tokens": 4},
    )
    assert submitted.status_code == 202, submitted.text
    task = submitted.json()["task_id"]

    def finished() -> dict[str, Any] | None:
        body = gateway.get(f"/v1/tasks/{task}").json()
        return body if body["status"] in ("COMPLETED", "FAILED", "CANCELLED") else None

    assert _until(finished, 300, "the async task")["status"] == "COMPLETED"


def test_grpc_generate_text(applied: dict) -> None:
    import grpc

    from dify_serving.grpc import dify_pb2 as pb
    from dify_serving.grpc import dify_pb2_grpc

    metadata = (("authorization", f"Bearer {os.environ['DIFY_MIRROR_E2E_KEY']}"),)
    with grpc.insecure_channel(os.environ["DIFY_MIRROR_E2E_GRPC"]) as channel:
        stub = dify_pb2_grpc.DifyServiceStub(channel)
        request = pb.TextRequest(model=f"{PREFIX}demo-llm", prompt="hi", max_tokens=4)
        answer = stub.GenerateText(request, metadata=metadata, timeout=120)
    assert answer.usage.completion_tokens >= 1


def test_metrics_name_the_models(applied: dict, gateway: httpx.Client) -> None:
    scraped = gateway.get("/v1/metrics")
    assert scraped.status_code == 200, scraped.text
    assert f'model="{PREFIX}demo-llm"' in scraped.text


def test_deleting_the_objects_removes_their_apps(
    applied: dict, api: Any, gateway: httpx.Client
) -> None:
    from kubernetes import client

    for name, doc in applied.items():
        api.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURALS[doc["kind"]], name)

    def gone() -> bool:
        for name, doc in applied.items():
            try:
                api.get_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, PLURALS[doc["kind"]], name
                )
                return False
            except client.ApiException as exc:
                assert exc.status == 404
        return True

    _until(gone, 300, "finalizers released")
    models = gateway.get("/v1/models/status").json()["models"]
    assert not [m for m in models if m["name"].startswith(PREFIX)]
