"""Tests that need Redis (127.0.0.1:6379) or PostgreSQL (127.0.0.1:5432, trust auth).

Each probes its service with `support.require_service`: skipped when it is down, failed
under `CI=true`. No Ray: a test that also starts Ray belongs in `tests/stack`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from support import require_service

#: The Redis of the services tests: a database of its own, keys under a random prefix.
REDIS_URL = os.environ.get("DIFY_MIRROR_REDIS_URL") or "redis://127.0.0.1:6379/15"


def pytest_itemcollected(item: pytest.Item) -> None:
    """Called through this folder's hooks only: the folder is the marker."""
    item.add_marker(pytest.mark.services)


@pytest.fixture()
def prefix() -> Iterator[str]:
    """A random Redis key prefix for one test; its keys are removed afterwards."""
    value = f"test-{uuid.uuid4().hex[:12]}:"
    require_service("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    stale = list(client.scan_iter(match=value + "*", count=1000))
    if stale:
        client.delete(*stale)
    client.close()
