"""The kopf operator against the emulated Kubernetes API (`kube_emulator.py`, kmock).

Ray is mostly absent (the operator must say so and keep retrying); `test_operator_ray.py`
starts a Ray of its own (`ray_cluster.py`) to follow a resource through to a replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from kube_emulator import KubeClient, start_emulator


def pytest_itemcollected(item: pytest.Item) -> None:
    """Called through this folder's hooks only: the folder is the marker."""
    item.add_marker(pytest.mark.operator)


@pytest_asyncio.fixture()
async def kube() -> AsyncIterator[tuple[KubeClient, str]]:
    """The emulated API on a free port, a client for it, and its URL."""
    async with start_emulator() as emu, aiohttp.ClientSession() as session:
        yield KubeClient(str(emu.url), session), str(emu.url).rstrip("/")
