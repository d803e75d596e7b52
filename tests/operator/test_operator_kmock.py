"""The real kopf operator loop against the emulated Kubernetes API (kmock).

Ray is not running for these tests (the dashboard URL points at a closed port), which is
itself a case to handle: the operator must say so in a condition and keep retrying.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
from kube_emulator import (
    DIFYINDEXES,
    DIFYMODELS,
    NS,
    condition,
    index,
    model,
    start_operator,
)

from dify_operator.settings import OperatorSettings


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_config() -> OperatorSettings:
    return OperatorSettings(
        ray_dashboard=f"http://127.0.0.1:{closed_port()}",
        status_period_s=0.5,
        retry_delay_s=1,
        peering=None,
    )


@pytest.mark.asyncio
async def test_invalid_spec_fails_permanently_with_the_message(kube: Any) -> None:
    client, url = kube
    op = await start_operator(url, offline_config())
    try:
        await client.create(DIFYMODELS, model("bad", precision="fp99"))

        async def failed() -> Any:
            obj = await client.get(DIFYMODELS, "bad", NS)
            return obj if (obj or {}).get("status", {}).get("phase") == "Failed" else None

        obj = await client.wait_for(failed, what="phase Failed")
        assert "precision" in obj["status"]["message"]
        reconciled = condition(obj, "Reconciled")
        assert reconciled["status"] == "False" and reconciled["reason"] == "InvalidSpec"
        events = await client.events_for("bad")
        assert any(e.get("reason") == "InvalidSpec" for e in events)
    finally:
        await op.stop()


@pytest.mark.asyncio
async def test_ray_unreachable_is_a_condition_and_retried(kube: Any) -> None:
    client, url = kube
    op = await start_operator(url, offline_config())
    try:
        await client.create(DIFYMODELS, model("llm"))

        async def unreachable() -> Any:
            c = condition(await client.get(DIFYMODELS, "llm", NS), "Reconciled")
            return c if c.get("reason") == "RayUnavailable" else None

        c = await client.wait_for(unreachable, what="Reconciled=False RayUnavailable")
        assert c["status"] == "False" and "unreachable" in c["message"]
        obj = await client.get(DIFYMODELS, "llm", NS)
        assert "difymirror.dev/finalizer" in obj["metadata"]["finalizers"]
    finally:
        await op.stop()


@pytest.mark.asyncio
async def test_index_waits_for_its_embedding_model_and_recovers(kube: Any) -> None:
    client, url = kube
    op = await start_operator(url, offline_config())
    try:
        await client.create(DIFYINDEXES, index("docs", embeddingModel="minilm"))

        async def reason() -> str | None:
            return condition(await client.get(DIFYINDEXES, "docs", NS), "Ready").get("reason")

        await client.wait_for(lambda: _is(reason, "EmbeddingModelMissing"), what="missing")
        obj = await client.get(DIFYINDEXES, "docs", NS)
        assert obj["status"]["phase"] == "Pending"
        await client.create(DIFYMODELS, model("minilm", task="feature-extraction"))
        await client.wait_for(lambda: _is(reason, "EmbeddingModelNotReady"), what="model seen")
    finally:
        await op.stop()


async def _is(fn: Any, value: str) -> bool:
    return bool(await fn() == value)


@pytest.mark.asyncio
async def test_peering_lets_only_one_operator_act(
    kube: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, url = kube
    await client.create("kopf.dev/v1/clusterkopfpeerings", {"metadata": {"name": "dify-mirror"}})
    caplog.set_level(logging.INFO, logger="kopf")
    config = offline_config()
    high = await start_operator(url, config, peering=("dify-mirror", "high", 100))
    low = None
    try:
        # kopf's peering is eventual: two operators started together may both act for a
        # moment. Started once the high one is on record, the low one never resumes.
        async def high_on_record() -> bool:
            peering = await client.get("kopf.dev/v1/clusterkopfpeerings", "dify-mirror")
            return "high" in (peering or {}).get("status", {})

        await client.wait_for(high_on_record, what="the high-priority operator's record")
        low = await start_operator(url, config, peering=("dify-mirror", "low", 50))
        await client.create(DIFYMODELS, model("bad", precision="fp99"))

        async def failed() -> bool:
            obj = await client.get(DIFYMODELS, "bad", NS)
            return (obj or {}).get("status", {}).get("phase") == "Failed"

        await client.wait_for(failed, what="phase Failed")
        actors = {
            r.threadName
            for r in caplog.records
            if "model_changed" in r.getMessage() and r.name.startswith("kopf.objects")
        }
        assert actors == {"kopf-high"}, actors
    finally:
        if low is not None:
            await low.stop()
        await high.stop()


@pytest.mark.asyncio
async def test_an_index_on_a_taken_collection_fails_with_the_reason(kube: Any) -> None:
    client, url = kube
    op = await start_operator(url, offline_config())
    try:
        await client.create(DIFYMODELS, model("minilm", task="feature-extraction"))
        await client.create(DIFYINDEXES, index("docs", embeddingModel="minilm"))
        await client.create(
            DIFYINDEXES, index("notes", embeddingModel="minilm", store={"collection": "docs"})
        )

        async def failed() -> Any:
            obj = await client.get(DIFYINDEXES, "notes", NS)
            return obj if (obj or {}).get("status", {}).get("phase") == "Failed" else None

        obj = await client.wait_for(failed, what="notes Failed")
        assert "'docs'" in obj["status"]["message"] and "collection" in obj["status"]["message"]
        first = await client.get(DIFYINDEXES, "docs", NS)  # it may have no phase yet
        assert (first or {}).get("status", {}).get("phase") != "Failed", first
    finally:
        await op.stop()
