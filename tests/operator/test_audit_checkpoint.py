"""Checkpoints of the audit chain's head in a ConfigMap, in the project's Kubernetes
emulator (kmock).

The file and the CLI: `tests/unit/test_audit_checkpoint.py`; Redis:
`tests/services/test_audit_checkpoint.py`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from audit_chain import KEY, run_sql, write
from kube_emulator import KubeClient, start_emulator

from dify_serving.security import audit
from dify_serving.security.audit import AuditLog, ChainKey, Checkpoint, CheckpointPlaces
from dify_serving.security.audit.checkpoint import (
    CONFIGMAP,
    CheckpointError,
    ConfigMapCheckpoint,
)


async def _configmap_data(client: KubeClient, name: str) -> dict[str, Any]:
    obj = await client.get("v1/configmaps", name, "default")
    return dict((obj or {}).get("data") or {})


@pytest.mark.asyncio
async def test_the_configmap_keeps_the_head_and_catches_a_missing_tail(tmp_path: Path) -> None:
    database = tmp_path / "audit.db"
    async with start_emulator() as emu, aiohttp.ClientSession() as session:
        client = KubeClient(str(emu.url), session)
        api = str(emu.url).rstrip("/")
        places = CheckpointPlaces(configmap=CONFIGMAP, kube_api=api, namespace="default")

        missing = ConfigMapCheckpoint(api, "default", CONFIGMAP, token="t")
        assert await asyncio.to_thread(missing.read) is None  # not created: nothing yet
        with pytest.raises(CheckpointError, match="does not exist"):
            await asyncio.to_thread(missing.update, lambda old: None)
        missing.close()

        await client.create("v1/configmaps", {"metadata": {"name": CONFIGMAP}}, "default")
        log = AuditLog(f"sqlite:///{database}", key=KEY, checkpoints=places)
        try:
            await asyncio.to_thread(write, log, 5)
            await asyncio.to_thread(log.checkpoint)
            stored = Checkpoint.from_json(
                (await _configmap_data(client, CONFIGMAP))["checkpoint"], ""
            )
            assert (stored.seq, stored.chain) == (5, ChainKey(KEY).chain_id)
            run_sql(database, "DELETE FROM audit_log WHERE seq > 3")
            await asyncio.to_thread(log.checkpoint)  # refused: the chain no longer holds it
            report = await asyncio.to_thread(log.verify)
        finally:
            await asyncio.to_thread(log.close)
        assert (report.ok, report.first_bad_seq, report.reason) == (
            False,
            4,
            audit.TAIL_MISSING,
        )
        assert report.checkpoint is not None
        assert report.checkpoint.source == f"configmap default/{CONFIGMAP}"
        assert report.checkpoint.seq == 5


@pytest.mark.asyncio
async def test_a_configmap_patched_meanwhile_is_not_overwritten() -> None:
    async with start_emulator() as emu, aiohttp.ClientSession() as session:
        client = KubeClient(str(emu.url), session)
        api = str(emu.url).rstrip("/")
        await client.create("v1/configmaps", {"metadata": {"name": CONFIGMAP}}, "default")
        place = ConfigMapCheckpoint(api, "default", CONFIGMAP, token="t")
        other = Checkpoint(7, "a" * 64, 1.0, ChainKey(KEY).chain_id)

        def racing_step(old: Checkpoint | None) -> Checkpoint:
            # another replica patches between our read and our patch
            httpx.patch(
                place.url,
                json={"data": {"checkpoint": other.to_json()}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            return Checkpoint(3, "b" * 64, 2.0, ChainKey(KEY).chain_id)

        try:
            assert await asyncio.to_thread(place.update, racing_step) is False
        finally:
            place.close()
        data = await _configmap_data(client, CONFIGMAP)
        assert Checkpoint.from_json(data["checkpoint"], "").seq == 7
