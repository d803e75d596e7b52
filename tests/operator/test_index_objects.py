"""Indexes over HTTP in a cluster: the gateway writes DifyIndex objects, the operator acts.

The emulated Kubernetes API (kmock), the real operator, a gateway in-process with the
Kubernetes catalog (`KubernetesCatalog`), and a stand-in Ray dashboard
(`serve_dashboard.py`) that accepts the operator's Serve configs. Deleting an index with
`reclaimPolicy: Delete` leaves the object with the operator's finalizer until the
operator has removed the app and the vectors (`dify_operator.reclaim`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from kube_emulator import DIFYINDEXES, DIFYMODELS, NS, KubeClient, model, start_operator
from serve_dashboard import ServeDashboard
from support import free_port

from dify_operator.settings import OperatorSettings
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.layout import index_shard_dir
from dify_serving.options import GatewayOptions, SecurityOptions


@pytest_asyncio.fixture()
async def http(
    kube: tuple[KubeClient, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway on the emulated API (its own loop is the test's: no thread in between)."""
    _, url = kube
    monkeypatch.setenv("DIFY_MIRROR_KUBE_API", url)
    monkeypatch.setenv("DIFY_MIRROR_NAMESPACE", NS)
    options = GatewayOptions(
        home=str(tmp_path / "gateway"),
        control="kubernetes",
        security=SecurityOptions(enabled=False),
    )
    app = create_app(GatewayState(options))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield client


def _spec(name: str, **spec: Any) -> dict[str, Any]:
    return {"name": name, "embeddingModel": "minilm", **spec}


@pytest.mark.asyncio
async def test_create_writes_a_difyindex_and_never_replaces_one(
    kube: tuple[KubeClient, str], http: httpx.AsyncClient
) -> None:
    client, _ = kube
    await client.create(DIFYMODELS, model("minilm", task="feature-extraction"))
    r = await http.post("/v1/indexes", json=_spec("kb", chunking={"maxTokens": 128}))
    assert r.status_code == 202, r.text
    assert r.json()["phase"] == "Pending"  # the operator takes it from here
    obj = await client.get(DIFYINDEXES, "kb", NS)
    assert obj is not None and obj["spec"]["embeddingModel"] == "minilm"
    assert obj["spec"]["chunking"]["maxTokens"] == 128
    r = await http.post("/v1/indexes", json=_spec("kb", chunking={"maxTokens": 256}))
    assert r.status_code == 409 and r.json()["error"]["code"] == "index_exists", r.text
    assert (await client.get(DIFYINDEXES, "kb", NS))["spec"]["chunking"]["maxTokens"] == 128
    r = await http.post("/v1/indexes", json=_spec("waits", embeddingModel="not-yet"))
    assert r.status_code == 202 and "'not-yet' does not exist" in r.json()["message"]
    listed = {i["name"]: i for i in (await http.get("/v1/indexes")).json()["data"]}
    assert set(listed) == {"kb", "waits"}
    # without an operator nothing holds the object: it goes at once, and says so
    r = await http.delete("/v1/indexes/waits")
    assert r.status_code == 200 and r.json()["phase"] == "Deleted", r.text
    assert r.json()["vectors"] == "retained" and "no operator" in r.json()["message"]
    assert await client.get(DIFYINDEXES, "waits", NS) is None
    assert (await http.delete("/v1/indexes/waits")).status_code == 404
    r = await http.post("/v1/data/search", json={"index": "waits", "query": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"


@pytest.mark.asyncio
async def test_the_operator_reclaims_a_deleted_index_by_its_policy(
    kube: tuple[KubeClient, str], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    client, url = kube
    serve = ServeDashboard()
    home = tmp_path / "nodes"
    config = OperatorSettings(
        ray_dashboard=serve.url,
        home=str(home),
        port=free_port(),
        status_period_s=0.5,
        retry_delay_s=1,
        peering=None,
    )
    op = await start_operator(url, config)
    try:
        await client.create(DIFYMODELS, model("minilm", task="feature-extraction"))
        for name, policy in (("gone", "Delete"), ("kept", "Retain")):
            r = await http.post("/v1/indexes", json=_spec(name, reclaimPolicy=policy))
            assert r.status_code == 202, r.text
            shard = index_shard_dir(home, name)
            shard.mkdir(parents=True)
            (shard / "segment").write_text("vectors")

        async def applied() -> bool:
            return {"index-gone", "index-kept"} <= serve.names()

        await client.wait_for(applied, timeout=60, what="the operator applied both indexes")

        async def finalized(name: str) -> bool:
            obj = await client.get(DIFYINDEXES, name, NS)
            return bool(obj and obj["metadata"].get("finalizers"))

        for name in ("gone", "kept"):
            await client.wait_for(lambda n=name: finalized(n), timeout=60, what="a finalizer")

        r = await http.delete("/v1/indexes/gone")
        assert r.status_code == 202, r.text
        assert (r.json()["vectors"], r.json()["reclaim_policy"]) == ("deleting", "Delete")
        r = await http.delete("/v1/indexes/kept")
        assert r.status_code == 202, r.text
        assert (r.json()["vectors"], r.json()["reclaim_policy"]) == ("retained", "Retain")

        async def both_gone() -> bool:
            objs = [await client.get(DIFYINDEXES, n, NS) for n in ("gone", "kept")]
            return objs == [None, None]

        await client.wait_for(both_gone, timeout=60, what="the finalizers to finish")
        assert not index_shard_dir(home, "gone").exists()
        assert (index_shard_dir(home, "kept") / "segment").read_text() == "vectors"
        assert not {"index-gone", "index-kept"} & serve.names()
        reasons = {e.get("reason") for e in await client.events_for("gone")}
        assert "Reclaimed" in reasons
    finally:
        await op.stop()
        serve.close()
