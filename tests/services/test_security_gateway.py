"""The guard in-process with its stores shared: limits in Redis across replicas, keys and
audit in PostgreSQL. The guard without services is `tests/unit/test_security_gateway.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateways import app_noting_text, close_all, gateway, through_guard
from support import AUTH, require_service

from dify_serving.options import SecurityOptions
from dify_serving.security.secrets import Secrets


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    close_all()


def test_replicas_share_one_limit_through_redis(home: Path) -> None:
    prefix_db = f"redis://127.0.0.1:6379/0?client_name=t{uuid.uuid4().hex[:6]}"
    first = gateway(home, redis_url=prefix_db)
    created = first.post(
        "/v1/admin/keys",
        json={"name": "r", "scopes": ["inference"], "rate_limit": {"requests_per_minute": 4}},
        headers=AUTH,
    ).json()
    second = gateway(home, redis_url=prefix_db)
    key = {"Authorization": f"Bearer {created['key']}"}
    statuses = [c.get("/v1/models", headers=key).status_code for c in (first, second) * 3]
    assert statuses.count(200) == 4 and statuses.count(429) == 2


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    import psycopg

    name = f"dm_gateway_{uuid.uuid4().hex[:10]}"
    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    require_service("PostgreSQL", lambda: psycopg.connect(url, connect_timeout=3).close())
    admin = psycopg.connect(url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


def test_keys_and_audit_live_in_postgresql_when_configured(home: Path, postgres_url: str) -> None:
    from dify_serving.gateway.security import Guard
    from dify_serving.security.audit import AuditLog

    guard = Guard(SecurityOptions(database=True), home, Secrets(home, database_url=postgres_url))
    try:
        created = guard.keys.create("pg", ["inference"])
        auth = [(b"authorization", f"Bearer {created.key}".encode())]
        assert through_guard(guard, app_noting_text, "/v1/inference", auth) == 200
        assert through_guard(guard, app_noting_text, "/v1/admin/keys", auth) == 403
        guard.audit.flush()
    finally:
        guard.close()
    assert not (home / "keys.db").exists() and not (home / "audit.db").exists()
    audit = AuditLog.from_settings_like(postgres_url, home)
    try:
        rows = audit.query(key_id=created.id)[0]
        assert [(r["route"], r["status"]) for r in rows] == [
            ("/v1/inference", 200),
            ("/v1/admin/keys", 403),
        ]
        assert audit.verify().ok
    finally:
        audit.close()
