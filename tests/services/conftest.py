"""Tests that need Redis (127.0.0.1:6379) or PostgreSQL (127.0.0.1:5432, trust auth).

Each probes its service with `support.require_service`: skipped when it is down, failed
under `CI=true`. No Ray: a test that also starts Ray belongs in `tests/stack`.
"""

from __future__ import annotations

import pytest


def pytest_itemcollected(item: pytest.Item) -> None:
    """Called through this folder's hooks only: the folder is the marker."""
    item.add_marker(pytest.mark.services)
