"""Checkpoints of the audit chain's head outside the database: file, Redis, ConfigMap.

Redis is the real server on 127.0.0.1:6379 (keys under a prefix unique to the test,
removed afterwards); the ConfigMap lives in the project's Kubernetes emulator (kmock).
The CLI and the gateway run in-process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis
from conftest import API_KEY, require_service, wait_for
from fastapi.testclient import TestClient
from kube_emulator import KubeClient, start_emulator
from sqlalchemy import create_engine, text

from dify_serving.cli import main
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions
from dify_serving.security import audit
from dify_serving.security.audit import AuditEntry, AuditLog, CheckpointPlaces
from dify_serving.security.audit_chain import ChainKey, Checkpoint
from dify_serving.security.audit_checkpoint import (
    CONFIGMAP,
    FILE_NAME,
    CheckpointError,
    ConfigMapCheckpoint,
)
from dify_serving.security.secrets import Secrets, audit_key, key_pepper
from dify_serving.settings import Settings

KEY = b"checkpoint-test-audit-key-012345"
REDIS_URL = "redis://127.0.0.1:6379/0"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def entry(n: int) -> AuditEntry:
    return AuditEntry(
        time=time.time(),
        request_id=f"req-{n}",
        key_id="key-a",
        client_ip="10.0.0.1",
        method="GET",
        route="/v1/models",
        status=200,
        latency_ms=1.0,
    )


def write(log: AuditLog, count: int) -> None:
    for n in range(count):
        log.record(entry(n))
    assert log.flush() == count


def run_sql(path: Path, sql: str) -> None:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def from_file(path: Path) -> Checkpoint | None:
    try:
        return Checkpoint.from_json(path.read_text(), "file")
    except (OSError, ValueError):
        return None


@pytest.fixture()
def redis_prefix() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    require_service("Redis", client.ping)
    prefix = f"dm:test:{uuid.uuid4().hex[:12]}:audit:"
    yield prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


def from_redis(key: str) -> Checkpoint | None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        raw = client.get(key)
    finally:
        client.close()
    return None if raw is None else Checkpoint.from_json(raw, "redis")


def test_the_head_is_checkpointed_at_least_every_interval_in_the_file_and_redis(
    tmp_path: Path, redis_prefix: str
) -> None:
    interval = 0.25
    file = tmp_path / FILE_NAME
    places = CheckpointPlaces(file=str(file), redis_url=REDIS_URL, redis_prefix=redis_prefix)
    redis_key = redis_prefix + ChainKey(KEY).chain_id
    log = AuditLog(
        f"sqlite:///{tmp_path / 'audit.db'}", key=KEY, checkpoints=places, checkpoint_s=interval
    )
    try:
        write(log, 5)
        for read in (lambda: from_file(file), lambda: from_redis(redis_key)):
            assert wait_for(lambda read=read: (read() or Checkpoint(0, "", 0, "")).seq == 5)
        write(log, 3)  # a new batch: the next checkpoint follows the head
        assert wait_for(lambda: (from_file(file) or Checkpoint(0, "", 0, "")).seq == 8)
        assert wait_for(lambda: (from_redis(redis_key) or Checkpoint(0, "", 0, "")).seq == 8)
        stamps: list[float] = []
        started = time.monotonic()
        while time.monotonic() - started < 8 * interval:  # nothing written: still refreshed
            point = from_redis(redis_key)
            if point is not None and (not stamps or point.time != stamps[-1]):
                stamps.append(point.time)
            time.sleep(0.01)
        assert len(stamps) >= 4, stamps
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert max(gaps) < interval + 0.5, gaps  # at least every interval (plus scheduling)
        report = log.verify()
        assert report.ok and report.checkpoint is not None and report.checkpoint.seq == 8
    finally:
        log.close()


def test_redis_alone_catches_a_missing_tail(tmp_path: Path, redis_prefix: str) -> None:
    database = tmp_path / "audit.db"
    places = CheckpointPlaces(redis_url=REDIS_URL, redis_prefix=redis_prefix)
    log = AuditLog(f"sqlite:///{database}", key=KEY, checkpoints=places)
    try:
        write(log, 6)
        log.checkpoint()
        run_sql(database, "DELETE FROM audit_log WHERE seq > 4")
        report = log.verify()
    finally:
        log.close()
    assert (report.ok, report.first_bad_seq, report.reason) == (False, 5, audit.TAIL_MISSING)
    assert report.checkpoint is not None and report.checkpoint.source.startswith("redis ")


@pytest.mark.parametrize("content", ["not json", '{"version": "audit.v2", "seq": -1}'])
def test_an_unreadable_checkpoint_fails_verify(tmp_path: Path, content: str) -> None:
    file = tmp_path / FILE_NAME
    places = CheckpointPlaces(file=str(file))
    database = f"sqlite:///{tmp_path / 'audit.db'}"
    log = AuditLog(database, key=KEY, checkpoints=places, checkpoint_s=None)
    try:
        write(log, 2)
        file.write_text(content)
        log.checkpoint()  # what it cannot judge, the writer leaves alone
        assert file.read_text() == content
        report = log.verify()
    finally:
        log.close()
    assert not report.ok and report.first_bad_seq is None
    assert report.reason is not None and report.reason.startswith(audit.CHECKPOINT_UNREADABLE)
    assert report.summary().startswith("audit chain NOT VERIFIED: checkpoint unreadable")


def test_an_unreachable_redis_fails_verify_and_never_stops_the_writer(tmp_path: Path) -> None:
    places = CheckpointPlaces(
        file=str(tmp_path / FILE_NAME),
        redis_url="redis://dm:hunter2@127.0.0.1:1/0",
        redis_prefix="x:",
    )
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", key=KEY, checkpoints=places)
    try:
        write(log, 3)
        log.checkpoint()
        assert (from_file(tmp_path / FILE_NAME) or Checkpoint(0, "", 0, "")).seq == 3
        report = log.verify()
    finally:
        log.close()
    assert not report.ok and report.reason is not None
    assert report.reason.startswith(f"{audit.CHECKPOINT_UNREADABLE}: redis x:")
    assert "hunter2" not in report.reason


def test_cli_verify_prints_the_head_and_json_for_scripts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    log = AuditLog.from_settings_like(None, home)
    write(log, 4)
    log.close()  # a writer checkpoints once more when it closes
    before = (home / FILE_NAME).read_text()

    monkeypatch.setenv("DIFY_MIRROR_HOME", str(home))
    for name in ("DATABASE_URL", "REDIS_URL", "AUDIT_CONFIGMAP"):
        monkeypatch.delenv(f"DIFY_MIRROR_{name}", raising=False)
    assert main(["audit", "verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "audit chain ok: 4 rows"
    assert lines[1].startswith("head:       seq 4 hash ") and len(lines[1].split()[-1]) == 64
    assert lines[2].startswith("checkpoint: seq 4 hash ")

    assert main(["audit", "verify", "--json"]) == 0
    good = json.loads(capsys.readouterr().out)
    assert (good["ok"], good["rows_checked"], good["first_bad_seq"], good["reason"]) == (
        True,
        4,
        None,
        None,
    )
    assert good["head"]["seq"] == 4 and good["checkpoint"]["seq"] == 4
    assert good["head"]["hash"] == good["checkpoint"]["hash"]
    assert isinstance(good["checkpoint"]["time"], float)
    assert (home / FILE_NAME).read_text() == before  # verify only reads

    run_sql(home / "audit.db", "DELETE FROM audit_log WHERE seq > 2")
    assert main(["audit", "verify", "--json"]) == 1
    bad = json.loads(capsys.readouterr().out)
    assert (bad["ok"], bad["rows_checked"], bad["first_bad_seq"], bad["reason"]) == (
        False,
        2,
        3,
        audit.TAIL_MISSING,
    )
    assert bad["head"]["seq"] == 2 and bad["checkpoint"]["seq"] == 4


def test_the_gateway_checkpoints_its_audit_chain_under_home_and_in_redis(
    tmp_path: Path, redis_prefix: str
) -> None:
    home = tmp_path
    options = GatewayOptions(
        home=str(home), security=SecurityOptions(redis=True, audit_checkpoint_s=0.2)
    )
    app = create_app(GatewayState(options), Secrets(home, redis_url=REDIS_URL))
    chain = ChainKey(audit_key(home, key_pepper(home))).chain_id
    redis_key = f"dm:audit:checkpoint:{chain}"
    try:
        with TestClient(app, client=("127.0.0.1", 40000)) as client:
            for _ in range(3):
                assert client.get("/v1/models", headers=AUTH).status_code == 200
            guard = app.state.guard
            guard.audit.flush()
            head = guard.audit.query(limit=1000)[0][-1]
            file = home / FILE_NAME
            assert head["seq"] >= 3
            assert wait_for(
                lambda: (from_file(file) or Checkpoint(0, "", 0, "")).seq >= head["seq"]
            )
            assert wait_for(
                lambda: (from_redis(redis_key) or Checkpoint(0, "", 0, "")).seq >= head["seq"]
            )
            point = from_file(file)
            assert point is not None and point.chain == chain
            report = guard.audit.verify()
            assert report.ok and report.checkpoint is not None
    finally:
        guard = getattr(app.state, "guard", None)
        if guard is not None:
            guard.close()
        client_ = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        client_.delete(redis_key)
        client_.close()


# ---- the ConfigMap, in the Kubernetes emulator ---------------------------------------


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


def test_configmap_names_that_would_change_the_url_are_refused() -> None:
    for namespace, name in (("default", "../secrets"), ("kube-system/x", CONFIGMAP)):
        with pytest.raises(ValueError, match="DNS label"):
            ConfigMapCheckpoint("http://127.0.0.1:1", namespace, name)


def test_the_configmap_is_used_only_when_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert CheckpointPlaces.detect(tmp_path).configmap is None
    monkeypatch.setenv("DIFY_MIRROR_AUDIT_CONFIGMAP", CONFIGMAP)
    assert Settings(home=tmp_path).security_options().audit_configmap == CONFIGMAP
    monkeypatch.setenv("DIFY_MIRROR_NAMESPACE", "serving")
    places = CheckpointPlaces.detect(tmp_path, "redis://secret@host", CONFIGMAP)
    assert (places.configmap, places.kube_api, places.namespace) == (
        CONFIGMAP,
        "https://10.0.0.1:443",
        "serving",
    )
    assert "secret" not in repr(places)
