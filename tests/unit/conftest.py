"""Unit tests: no Redis, no PostgreSQL, no Ray. The whole folder runs in well under a
minute (`make test-unit`); in-process gateways, subprocesses and local sockets are fine.

A test that starts Ray belongs in `tests/stack`, one that needs Redis or PostgreSQL in
`tests/services`, one that needs the emulated Kubernetes API in `tests/operator`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


def pytest_itemcollected(item: pytest.Item) -> None:
    """Called through this folder's hooks only: the folder is the marker."""
    item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _no_ray() -> Iterator[None]:
    """A Serve call without a cluster may start a local Ray quietly: fail the test that did
    (in a whole-suite run the stack group's session Ray may already be up: not this test's)."""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    started = ray is not None and ray.is_initialized() and not before
    assert not started, "this test started Ray: see tests/stack"
