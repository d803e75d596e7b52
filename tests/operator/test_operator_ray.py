"""Everything real but the Kubernetes API: kmock → kopf operator → Ray Serve → gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import pytest_asyncio
from kube_emulator import (
    DIFYINDEXES,
    DIFYMODELS,
    NS,
    KubeClient,
    condition,
    index,
    model,
    start_emulator,
    start_operator,
)
from support import AUTH, free_port

from dify_operator.settings import OperatorSettings
from dify_serving.control import ray_auth_token

TESTS = Path(__file__).parents[1]


@pytest_asyncio.fixture()
async def cluster(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Emulated API + a real Ray (separate process, its own dashboard) + operator config."""
    async with start_emulator() as emu, aiohttp.ClientSession() as session:
        url = str(emu.url).rstrip("/")
        env = {
            **os.environ,
            "DIFY_MIRROR_KUBE_API": url,
            "DIFY_MIRROR_NAMESPACE": NS,
            "HF_HUB_OFFLINE": "1",
            "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "2",
        }
        ray = subprocess.Popen(
            [sys.executable, str(TESTS / "ray_cluster.py"), str(free_port())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert ray.stdout is not None
            dashboard = (await asyncio.to_thread(ray.stdout.readline)).strip()
            assert dashboard.startswith("http://"), "Ray did not start"
            config = OperatorSettings(
                ray_dashboard=dashboard,
                host="127.0.0.1",
                port=free_port(),
                home=str(tmp_path / "home"),
                status_period_s=0.5,
                ready_period_s=2,
                retry_delay_s=1,
                peering=None,
                gateway_url="http://gw.example",
            )
            yield {
                "kube": KubeClient(url, session),
                "url": url,
                "config": config,
                "dashboard": dashboard,
            }
        finally:
            ray.terminate()
            await asyncio.to_thread(ray.wait, 60)


async def serve_apps(dashboard: str) -> dict[str, Any]:
    token = ray_auth_token()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        body = (await http.get(f"{dashboard}/api/serve/applications/")).json()
    return body.get("applications") or {}


def replica_ids(apps: dict[str, Any]) -> dict[str, list[str]]:
    return {
        n: sorted(r["replica_id"] for d in a["deployments"].values() for r in d["replicas"])
        for n, a in apps.items()
    }


@pytest.mark.asyncio
async def test_model_lifecycle_through_the_operator(cluster: dict[str, Any]) -> None:
    kube: KubeClient = cluster["kube"]
    config: OperatorSettings = cluster["config"]
    op = await start_operator(cluster["url"], config)
    try:
        await kube.create(
            DIFYMODELS, model("demo", resources={"cpus": 0.5}, generation={"maxNewTokens": 16})
        )

        async def ready() -> Any:
            obj = await kube.get(DIFYMODELS, "demo", NS)
            return obj if (obj or {}).get("status", {}).get("phase") == "Ready" else None

        obj = await kube.wait_for(ready, timeout=300, interval=0.5, what="demo Ready")
        status = obj["status"]
        assert status["readyReplicas"] == 1 and status["observedGeneration"] == 1
        assert status["endpoint"] == "http://gw.example/v1"
        assert condition(obj, "Ready")["status"] == "True"
        assert condition(obj, "Reconciled")["reason"] == "Applied"
        reasons = {e.get("reason") for e in await kube.events_for("demo")}
        assert {"Applied", "Ready"} <= reasons

        base = f"http://127.0.0.1:{config.port}"
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=AUTH) as http:
            for _ in range(120):  # the gateway lists DifyModels every 2 s
                r = await http.post(
                    "/v1/inference", json={"model": "demo", "prompt": "hi", "max_tokens": 4}
                )
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.5)
            assert r.status_code == 200, r.text

            # In a cluster, load/unload write DifyModel objects: Kubernetes stays the truth.
            r = await http.post("/v1/models/load", json={"name": "extra", "modelId": "x/y"})
            assert r.status_code == 202, r.text
            created = await kube.get(DIFYMODELS, "extra", NS)
            assert created is not None and created["spec"]["modelId"] == "x/y"
            assert (await http.post("/v1/models/unload", json={"name": "extra"})).status_code == 202
            await kube.wait_for(lambda: _gone(kube, "extra"), timeout=60, what="extra gone")

        # Restart: the operator converges to the same Serve config, nothing redeploys.
        before = replica_ids(await serve_apps(cluster["dashboard"]))
        await op.stop()
        op = await start_operator(cluster["url"], config)
        await asyncio.sleep(3)
        after = replica_ids(await serve_apps(cluster["dashboard"]))
        assert after == before and set(after) == {"gateway", "tasks", "model-demo"}
        assert op.exception is None

        # Drift: an app removed from Serve behind the operator's back comes back.
        token = ray_auth_token()
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
            deployed = (await http.get(f"{cluster['dashboard']}/api/serve/applications/")).json()
            config_without = {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": config.port},
                "applications": [
                    a["deployed_app_config"]
                    for n, a in deployed["applications"].items()
                    if n != "model-demo"
                ],
            }
            r = await http.put(
                f"{cluster['dashboard']}/api/serve/applications/", json=config_without
            )
            assert r.status_code == 200, r.text

        async def demo_back() -> bool:
            return "model-demo" in await serve_apps(cluster["dashboard"])

        async def drift_seen() -> bool:
            return any(e.get("reason") == "Drift" for e in await kube.events_for("demo"))

        await kube.wait_for(drift_seen, timeout=60, what="drift noticed")
        await kube.wait_for(demo_back, timeout=120, interval=0.5, what="model-demo re-applied")

        # Indexes: Pending until their embedding model is Ready, then Ready; on deletion
        # reclaimPolicy decides whether the vectors stay.
        home = Path(config.home)
        for name in ("kept", "dropped"):
            (home / "indexes" / name).mkdir(parents=True)
        await kube.create(DIFYINDEXES, index("kept", embeddingModel="mini", reclaimPolicy="Retain"))
        await kube.create(
            DIFYINDEXES, index("dropped", embeddingModel="mini", reclaimPolicy="Delete")
        )

        async def index_reason(name: str) -> str | None:
            return condition(await kube.get(DIFYINDEXES, name, NS), "Ready").get("reason")

        async def reason_is(name: str, value: str) -> bool:
            return await index_reason(name) == value

        await kube.wait_for(lambda: reason_is("kept", "EmbeddingModelMissing"), what="missing")
        await kube.create(
            DIFYMODELS,
            model(
                "mini",
                task="feature-extraction",
                modelId="sentence-transformers/all-MiniLM-L6-v2",
                resources={"cpus": 0.5},
            ),
        )
        await kube.wait_for(
            lambda: reason_is("kept", "EmbeddingModelReady"),
            timeout=300,
            interval=0.5,
            what="index Ready",
        )
        assert (await kube.get(DIFYINDEXES, "kept", NS))["status"]["phase"] == "Ready"
        for name in ("kept", "dropped"):
            await kube.delete(DIFYINDEXES, name, NS)
            await kube.wait_for(
                lambda n=name: _gone(kube, n, DIFYINDEXES), timeout=60, what=f"{name} gone"
            )
        assert (home / "indexes" / "kept").is_dir()
        assert not (home / "indexes" / "dropped").exists()
        await kube.delete(DIFYMODELS, "mini", NS)

        # Delete: the Serve app goes first, then the finalizer is released.
        await kube.delete(DIFYMODELS, "demo", NS)
        await kube.wait_for(lambda: _gone(kube, "demo"), timeout=120, what="demo gone")
        apps = await serve_apps(cluster["dashboard"])
        assert "model-demo" not in apps and "model-mini" not in apps
    finally:
        await op.stop()


async def _gone(kube: KubeClient, name: str, resource: str = DIFYMODELS) -> bool:
    return await kube.get(resource, name, NS) is None
