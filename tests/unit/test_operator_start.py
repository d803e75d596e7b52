"""What `python -m dify_operator` hands kopf, without a cluster: kopf.operator is replaced."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from dify_operator import __main__ as entry


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every kopf.operator() call main() makes."""
    calls: list[dict[str, Any]] = []

    async def operator(**kwargs: Any) -> None:
        calls.append(kwargs)

    monkeypatch.setattr(kopf, "operator", operator)
    monkeypatch.delenv("DIFY_MIRROR_PEERING", raising=False)
    monkeypatch.delenv("DIFY_MIRROR_PEERING_PRIORITY", raising=False)
    monkeypatch.delenv("DIFY_MIRROR_GATEWAY_REPLICAS", raising=False)
    return calls


def test_replicas_peer_with_random_priorities(
    started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf pauses every peer that shares a priority: two replicas at the default 0 would
    both stand still, so each start draws one."""
    drawn = iter([17, 29001])
    asked: list[tuple[int, int]] = []

    def randint(low: int, high: int) -> int:
        asked.append((low, high))
        return next(drawn)

    monkeypatch.setattr(entry.random, "randint", randint)
    entry.main()
    entry.main()
    assert asked == [(1, 32767)] * 2
    assert [c["priority"] for c in started] == [17, 29001]
    assert all(c["peering_name"] == "dify-mirror" and not c["standalone"] for c in started)


def test_a_configured_priority_is_used_as_given(
    started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFY_MIRROR_PEERING_PRIORITY", "0")
    entry.main()
    assert started[0]["priority"] == 0


def test_standalone_without_a_peering_name(
    started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFY_MIRROR_PEERING", "")
    entry.main()
    assert started[0]["standalone"] is True and started[0]["peering_name"] is None
