"""What tests of every group share: the admin key, service probes, manifests, ports.

Plain functions and constants, no fixtures: a test module imports them by name
(`from support import AUTH`); fixtures live in the conftest of the group that needs them.
`tests/conftest.py` puts this folder on `sys.path` and sets the session's environment,
the bootstrap key included, before any test module is imported.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest

#: The admin key every stack and in-process gateway of the session is bootstrapped with.
API_KEY = os.environ["DIFY_MIRROR_BOOTSTRAP_KEY"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def require_service(name: str, probe: Callable[[], object]) -> None:
    """Skip when a local service is down; under CI (`CI=true`) that is a failure instead."""
    try:
        probe()
    except Exception as exc:
        message = f"{name} is not reachable at its local address: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Whether `predicate` came true within `timeout_s` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_doc(name: str, model_id: str, task: str, **spec: object) -> dict:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": name},
        "spec": {"modelId": model_id, "task": task, "resources": {"cpus": 0.25}, **spec},
    }


def index_doc(name: str, model: str, **spec: object) -> dict:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyIndex",
        "metadata": {"name": name},
        "spec": {"embeddingModel": model, **spec},
    }
