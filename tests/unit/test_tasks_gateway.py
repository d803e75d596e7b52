"""`POST /v1/inference/async` in an in-process gateway: refusals that need no consumer.

A broker that is down refuses the task at once (503, Retry-After) and leaves no row
behind; a key at its limit of unfinished tasks gets 429. The rest of the task API runs
against the real stack (`tests/stack/test_tasks_api.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from gateways import close_all, seed_support_and_other
from support import AUTH, free_port

from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, TaskOptions
from dify_serving.security.secrets import Secrets


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield seed_support_and_other(tmp_path)
    close_all()


def client_for(home: Path, **tasks: object) -> TestClient:
    options = GatewayOptions(home=str(home), tasks=TaskOptions(**tasks))  # type: ignore[arg-type]
    app = create_app(GatewayState(options), Secrets(home))
    return TestClient(app, raise_server_exceptions=False)


def rows(home: Path) -> int:
    engine = sa.create_engine(f"sqlite:///{home / 'tasks.db'}")
    with engine.connect() as db:
        return int(db.execute(sa.text("SELECT count(*) FROM dify_tasks")).scalar_one())


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_broker_that_is_down_refuses_the_task_and_keeps_nothing(
    home: Path, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    scheme = "redis://" if broker == "redis" else "amqp://guest:hunter2@"
    monkeypatch.setenv("DIFY_MIRROR_BROKER_URL", f"{scheme}127.0.0.1:{port}/0")
    client = client_for(home, broker=broker)
    r = client.post("/v1/inference/async", json={"model": "other-llm", "prompt": "x"}, headers=AUTH)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "5"
    error = r.json()["error"]
    assert error["code"] == "broker_unavailable"
    assert str(port) not in error["message"] and "hunter2" not in error["message"]
    assert rows(home) == 0  # never accepted, so nothing to lose


def test_a_key_at_its_limit_of_unfinished_tasks_gets_429(home: Path) -> None:
    client = client_for(home, max_pending_per_key=2)
    body = {"model": "other-llm", "prompt": "x"}
    for _ in range(2):
        assert client.post("/v1/inference/async", json=body, headers=AUTH).status_code == 202
    r = client.post("/v1/inference/async", json=body, headers=AUTH)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_tasks"
    assert rows(home) == 2
