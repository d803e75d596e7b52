"""What goes into a vector backend and what comes out: points, hits, collection figures.

Kept apart from the backends so the index deployment and the benchmarks can build points
(`point_id`, `ChunkPoint`) without loading a Qdrant binding.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_ID_NAMESPACE = uuid.UUID("5b0c7f0e-3d55-4a8e-9a52-6a2f4d1c9e17")


@dataclass(frozen=True, slots=True)
class ChunkPoint:
    """One chunk to store: id from `point_id`, a 1-D vector, its payload.

    The payload has document_id, chunk_index, text, start, end, subject_id (or None),
    metadata (dict) and version (str).
    """

    id: str
    vector: Sequence[float] | np.ndarray
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoreInfo:
    points: int
    indexed: int
    segments: int

    @property
    def unindexed(self) -> int:
        """Points searched exactly because no HNSW graph covers them yet."""
        return max(0, self.points - self.indexed)


def point_id(index: str, document_id: str, chunk_index: int) -> str:
    """The stable point id of a document's chunk (uuid5): re-upserting overwrites in place."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{index}\x1f{document_id}\x1f{chunk_index}"))
