"""Calls one gateway replica has in flight per model or index app, bounded.

Serve admits `max_ongoing_requests` per replica and, by default, queues everything else
at the caller without end. Its own bound on that queue (`max_queued_requests`) cost
7–9% of the embedding throughput here (three interleaved pairs of `make bench
embeddings`: 0.72× with it against 0.79× without, docs/benchmarks.md), because the
router then tracks the queue on every call. A counter per app in the gateway costs a
dict update: past `(1 + QUEUED_PER_SLOT)` calls per slot the models admit, a caller gets
503 "overloaded" with Retry-After at once instead of waiting in an ever longer queue.
"""

from __future__ import annotations

from dify_serving.gateway.errors import ApiError
from dify_serving.render import INDEX_MAX_ONGOING
from dify_serving.specs import DifyModelSpec

#: Calls that may wait at this gateway per call a replica admits (its slots).
QUEUED_PER_SLOT = 4


def model_bound(spec: DifyModelSpec) -> int:
    """In-flight calls for a model: running plus waiting, over all its replicas."""
    replicas = spec.autoscaling.max_replicas if spec.autoscaling else max(1, spec.replicas)
    return (1 + QUEUED_PER_SLOT) * spec.batching.max_concurrent_requests * replicas


INDEX_BOUND = (1 + QUEUED_PER_SLOT) * INDEX_MAX_ONGOING  # one replica per index


class InFlight:
    """Counts calls per app of one kind (models or indexes) against their bounds."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._held: dict[str, int] = {}

    def take(self, name: str, bound: int) -> None:
        held = self._held.get(name, 0)
        if held >= bound:
            raise ApiError(
                503,
                "overloaded",
                f"{self.kind} {name!r} has {held} requests in flight from this gateway (at "
                f"most {bound}); retry shortly",
                headers={"Retry-After": "1"},
            )
        self._held[name] = held + 1

    def give_back(self, name: str) -> None:
        self._held[name] -= 1

    def held(self, name: str) -> int:
        return self._held.get(name, 0)
