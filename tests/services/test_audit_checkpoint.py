"""Checkpoints of the audit chain's head in Redis, the real server on 127.0.0.1:6379 (keys
under a prefix unique to the test, removed afterwards); the gateway runs in-process.

The file and the CLI: `tests/unit/test_audit_checkpoint.py`; the ConfigMap in the
Kubernetes emulator: `tests/operator/test_audit_checkpoint.py`.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from audit_chain import KEY, from_file, run_sql, write
from fastapi.testclient import TestClient
from support import AUTH, require_service, wait_for

from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions
from dify_serving.security import audit
from dify_serving.security.audit import AuditLog, ChainKey, Checkpoint, CheckpointPlaces
from dify_serving.security.audit.checkpoint import (
    FILE_NAME,
)
from dify_serving.security.secrets import Secrets, audit_key, key_pepper

REDIS_URL = "redis://127.0.0.1:6379/0"


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
