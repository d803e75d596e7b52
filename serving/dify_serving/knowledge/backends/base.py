"""The vector backend interface, and what its two implementations share.

Both backends are the Qdrant engine, so scores, filters and HNSW behave alike and one
congruence suite compares their answers. `QdrantEdgeBackend` (`qdrant_edge.py`) keeps an
index on local disk inside the replica; `QdrantServerBackend` (`qdrant_server.py`) talks
to a Qdrant server through `qdrant_client` (whose local mode stands in for the server in
tests). `BackendBase` holds the behaviour, so a backend only supplies the engine calls;
`open_backend` (the package) picks one. Nothing here imports a backend.

Replacement. Point ids are stable per (index, document, position) and every point carries
the `version` of the upsert that wrote it: a re-upsert that fits one engine call
(`UPSERT_BATCH` points, applied whole) overwrites chunks in place, then the document's
points of any other version (the old tail when the new text has fewer chunks) are
deleted. A search between the two steps may see the old tail; a crash between them leaves
it until the document is written again. A larger write takes several calls, so it is
journaled and writes new ids beside the old points (`knowledge/journal.py`): a replica
killed in the middle leaves each document wholly old or wholly new once the next replica
opens the collection.

Payload indexes are keyword indexes on `document_id`, `subject_id` and each
`metadata.<field>`, untyped on purpose. Not on `version`: every upsert writes a new
value, and a keyword index keeps every value it ever saw (a shard rewritten 15,000 times
grew 5 MiB of RSS for it); a version is only ever matched beside `document_id`, which
narrows the points to check to one document's. Collections from before lose it on open.
Scores are Qdrant's: similarity for Cosine and Dot (`score_threshold` a lower bound), a
distance for Euclid (an upper bound). What we measured of Qdrant Edge, and why the index
typing is what it is: docs/knowledge.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dify_serving.knowledge.errors import DimensionMismatch, StoreError
from dify_serving.knowledge.filters import (
    POINT_FIELDS,
    Match,
    MatchAny,
    StoreFilter,
    build_filter,
    payload_key,
)
from dify_serving.knowledge.journal import PendingDocument, WriteJournal, versioned_id
from dify_serving.knowledge.points import ChunkPoint, Hit, StoreInfo
from dify_serving.specs import DifyIndexSpec, Quantization

#: Vectors (KB) a segment must hold before Qdrant builds its HNSW graph.
INDEXING_THRESHOLD_KB = 10_000
#: Below this many KB of matching vectors a filtered search scans instead of using HNSW.
FULL_SCAN_THRESHOLD_KB = 10_000
#: Points per engine call: bounds request size (server) and GIL hold time (embedded).
UPSERT_BATCH = 1024
log = logging.getLogger(__name__)

#: Keyword indexes every collection gets.
INDEXED_FIELDS = ("document_id", "subject_id")
#: Indexes earlier releases made that a collection drops when it is opened.
RETIRED_INDEXES = ("version",)

FilterArg = Mapping[str, Any] | StoreFilter | None
#: One upserted point as the engines take it: (id, vector, payload).
RawPoint = tuple[str, list[float], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class SearchArgs:
    """One search's settings as `BackendBase` hands them to a backend's `_query`."""

    top_k: int
    filter: StoreFilter | None
    score_threshold: float | None
    exact: bool
    #: hnsw_ef: the spec's `ef`, raised to `top_k` so HNSW can return that many.
    ef: int


# ---- the interface ----------------------------------------------------------------------
@runtime_checkable
class VectorBackend(Protocol):
    """What the index deployment needs from a backend: `QdrantEdgeBackend`,
    `QdrantServerBackend`."""

    name: str
    allowed_fields: frozenset[str]
    """Fields a search filter may name: the point fields and the spec's filterable ones."""
    blocking_io: bool
    """Whether a call waits on I/O with the GIL released (a server): then a thread lets
    the event loop serve others meanwhile; an in-process engine holding the GIL gains
    nothing from one."""

    @property
    def dimension(self) -> int | None: ...
    def ensure(self, dimension: int) -> None: ...
    def replace_document(self, document_id: str, points: list[ChunkPoint]) -> int: ...
    def upsert_many(self, docs: Sequence[tuple[str, list[ChunkPoint]]]) -> dict[str, int]: ...
    def search(
        self,
        vector: Sequence[float] | np.ndarray,
        top_k: int,
        filter: FilterArg = None,
        score_threshold: float | None = None,
        exact: bool = False,
    ) -> list[Hit]: ...
    def search_batch(
        self,
        vectors: Sequence[Sequence[float] | np.ndarray] | np.ndarray,
        top_k: int,
        filter: FilterArg = None,
        score_threshold: float | None = None,
        exact: bool = False,
    ) -> list[list[Hit]]: ...
    def delete_documents(self, document_ids: Sequence[str]) -> int: ...
    def delete_subject(self, subject_id: str) -> int: ...
    def count(self) -> int: ...
    def info(self) -> StoreInfo: ...
    def needs_optimize(self) -> bool: ...
    def optimize(self) -> bool: ...
    def close(self) -> None: ...
    def drop(self) -> None: ...
    def open_journal(self, path: Path) -> dict[str, str]: ...


class BackendBase:
    """What both backends share; they supply the engine calls (`_upsert`, `_query`, …)."""

    blocking_io = False

    def __init__(self, name: str, spec: DifyIndexSpec) -> None:
        self.name = name
        self.spec = spec
        self.allowed_fields = frozenset({*POINT_FIELDS, *spec.filterable_fields})
        self._writes = threading.Lock()
        self._dimension: int | None = None
        self.journal = WriteJournal(None)

    # engine calls --------------------------------------------------------------------
    def _upsert(self, batch: list[RawPoint]) -> None:
        raise NotImplementedError

    def _count(self, flt: StoreFilter | None) -> int:
        raise NotImplementedError

    def _delete(self, flt: StoreFilter) -> None:
        raise NotImplementedError

    def _facet(self, flt: StoreFilter, limit: int) -> Iterable[Any]:
        """Facet hits (`.value`, `.count`) on `document_id` under `flt`."""
        raise NotImplementedError

    def _query(self, rows: np.ndarray, args: SearchArgs) -> list[list[Any]]:
        """Scored points (`.id`, `.score`, `.payload`), one list per row."""
        raise NotImplementedError

    def _stats(self) -> Any:
        """The engine's info (points/indexed_vectors/segments counts); None when absent."""
        raise NotImplementedError

    # settings both engines take ------------------------------------------------------
    def _hnsw(self) -> dict[str, Any]:
        hnsw = self.spec.store.hnsw
        return {
            "m": hnsw.m,
            "ef_construct": hnsw.ef_construct,
            "full_scan_threshold": FULL_SCAN_THRESHOLD_KB,
        }

    def _scalar_quantization(self) -> Quantization | None:
        quantization = self.spec.store.quantization
        return quantization if quantization is not None and quantization.scalar else None

    def _adopt(self, existing: int | None, requested: int) -> None:
        """Record the collection's vector size: `existing` when there is a collection."""
        self._dimension = requested if existing is None else existing
        if self._dimension != requested:
            raise DimensionMismatch(self.name, self._dimension, requested)

    def _missing_indexes(self, known: Iterable[str]) -> list[str]:
        """Payload keys that should have a keyword index and have none yet."""
        present = set(known)
        wanted = [*INDEXED_FIELDS, *(payload_key(f) for f in self.spec.filterable_fields)]
        return [key for key in dict.fromkeys(wanted) if key not in present]

    @staticmethod
    def _retired_indexes(known: Iterable[str]) -> list[str]:
        """Payload indexes the collection has and should not any more."""
        present = set(known)
        return [key for key in RETIRED_INDEXES if key in present]

    # shared behaviour ------------------------------------------------------------------
    @property
    def dimension(self) -> int | None:
        """The collection's vector size; None while there is no collection."""
        return self._dimension

    def _require(self) -> int:
        if self._dimension is None:
            raise StoreError(f"collection {self.name!r} does not exist (call ensure first)")
        return self._dimension

    def _rows(self, vectors: Any) -> np.ndarray:
        dimension = self._require()
        rows = np.asarray(vectors, dtype=np.float32)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        if rows.ndim != 2:
            raise StoreError(f"vectors must be 1-D rows; got shape {rows.shape}")
        if rows.shape[1] != dimension:
            raise DimensionMismatch(self.name, dimension, rows.shape[1])
        return rows

    def _filter(self, flt: FilterArg) -> StoreFilter | None:
        if flt is None or isinstance(flt, StoreFilter):
            return flt
        return build_filter(flt, self.allowed_fields)

    def _put(self, points: list[ChunkPoint]) -> None:
        for at in range(0, len(points), UPSERT_BATCH):
            self._upsert(
                [
                    (p.id, np.asarray(p.vector, dtype=np.float32).tolist(), dict(p.payload))
                    for p in points[at : at + UPSERT_BATCH]
                ]
            )

    def _per_document(self, flt: StoreFilter, limit: int) -> dict[str, int]:
        return {str(h.value): int(h.count) for h in self._facet(flt, limit)}

    def replace_document(self, document_id: str, points: list[ChunkPoint]) -> int:
        """Write a document's chunks, then drop its older ones; returns stale points removed."""
        return self.upsert_many([(document_id, points)])[document_id]

    def upsert_many(self, docs: Sequence[tuple[str, list[ChunkPoint]]]) -> dict[str, int]:
        """`replace_document` for many at once: one batched write, then one delete per
        upsert version. Returns stale points removed per document (the last entry of a
        document given twice wins; an empty chunk list removes the document)."""
        latest = dict(docs)
        by_version: dict[str, list[str]] = {}
        emptied: list[str] = []
        dimension = self._require()
        for doc_id, points in latest.items():
            if not points:
                emptied.append(doc_id)
                continue
            versions = set()
            for point in points:
                if point.payload.get("document_id") != doc_id:
                    raise StoreError(f"point {point.id} does not belong to document {doc_id!r}")
                if len(point.vector) != dimension:
                    raise DimensionMismatch(self.name, dimension, len(point.vector))
                versions.add(point.payload.get("version"))
            if len(versions) != 1 or None in versions:
                raise StoreError(f"document {doc_id!r}: points need one shared payload version")
            by_version.setdefault(str(versions.pop()), []).append(doc_id)
        stale = [
            StoreFilter(
                must=(MatchAny("document_id", tuple(ids)),), must_not=(Match("version", v),)
            )
            for v, ids in by_version.items()
        ]
        if emptied:
            stale.append(StoreFilter(must=(MatchAny("document_id", tuple(emptied)),)))
        removed = dict.fromkeys(latest, 0)
        points = [point for points in latest.values() for point in points]
        several = len(points) > UPSERT_BATCH  # several engine calls: journaled, new ids
        with self._writes:
            if several:
                self.journal.begin(
                    {
                        doc_id: PendingDocument(
                            str(doc_points[0].payload["version"]), len(doc_points)
                        )
                        for doc_id, doc_points in latest.items()
                        if doc_points
                    }
                )
                points = [
                    ChunkPoint(versioned_id(p.id, str(p.payload["version"])), p.vector, p.payload)
                    for p in points
                ]
            self._put(points)
            for flt in stale:
                counts = self._per_document(flt, limit=len(latest))
                if counts:
                    self._delete(flt)
                    removed.update(counts)
            if several:
                self.journal.end()
        return removed

    def open_journal(self, path: Path) -> dict[str, str]:
        """Keep multi-call writes' journal at `path`, first finishing or undoing the write
        a killed replica left there (see `knowledge/journal.py`); returns what became of
        each of its documents ("finished" or "undone")."""
        journal = WriteJournal(path)
        outcome: dict[str, str] = {}
        with self._writes:
            pending = journal.pending()
            if pending and self._dimension is not None:
                for doc_id, write in pending.items():
                    mine = StoreFilter(
                        must=(Match("document_id", doc_id), Match("version", write.version))
                    )
                    if self._count(mine) == write.points:
                        others = StoreFilter(
                            must=(Match("document_id", doc_id),),
                            must_not=(Match("version", write.version),),
                        )
                        if self._count(others):
                            self._delete(others)
                        outcome[doc_id] = "finished"
                    else:
                        if self._count(mine):
                            self._delete(mine)
                        outcome[doc_id] = "undone"
            journal.end()
            self.journal = journal
        if outcome:
            undone = sum(1 for o in outcome.values() if o == "undone")
            log.warning(
                "index %s: a write cut short was repaired: %d document(s) finished, %d undone",
                self.name,
                len(outcome) - undone,
                undone,
            )
        return outcome

    def search(
        self,
        vector: Sequence[float] | np.ndarray,
        top_k: int,
        filter: FilterArg = None,
        score_threshold: float | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        """The `top_k` nearest points (HNSW with hnsw_ef ≥ top_k unless `exact`)."""
        return self.search_batch([vector], top_k, filter, score_threshold, exact)[0]

    def search_batch(
        self,
        vectors: Sequence[Sequence[float] | np.ndarray] | np.ndarray,
        top_k: int,
        filter: FilterArg = None,
        score_threshold: float | None = None,
        exact: bool = False,
    ) -> list[list[Hit]]:
        """`search` for several vectors in one engine call; one list per vector."""
        if top_k < 1:
            raise StoreError("top_k must be at least 1")
        flt = self._filter(filter)
        rows = self._rows(vectors)
        if not len(rows):
            return []
        ef = max(self.spec.store.hnsw.ef, top_k)
        results = self._query(rows, SearchArgs(top_k, flt, score_threshold, exact, ef))
        return [
            [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in points]
            for points in results
        ]

    def _delete_where(self, flt: StoreFilter) -> int:
        with self._writes:
            removed = self._count(flt)
            if removed:
                self._delete(flt)
        return removed

    def delete_documents(self, document_ids: Sequence[str]) -> int:
        """Remove these documents' points; returns how many went."""
        if not document_ids or self._dimension is None:
            return 0
        return self._delete_where(StoreFilter(must=(MatchAny("document_id", tuple(document_ids)),)))

    def delete_subject(self, subject_id: str) -> int:
        """Remove every point about one subject; returns how many went."""
        if self._dimension is None:
            return 0
        return self._delete_where(StoreFilter(must=(Match("subject_id", subject_id),)))

    def count(self) -> int:
        """Points stored (exact); 0 while there is no collection."""
        return 0 if self._dimension is None else self._count(None)

    def info(self) -> StoreInfo:
        raw = self._stats()
        if raw is None:
            return StoreInfo(0, 0, 0)
        return StoreInfo(
            int(raw.points_count or 0),
            int(raw.indexed_vectors_count or 0),
            int(raw.segments_count or 0),
        )

    def needs_optimize(self) -> bool:
        return False

    def optimize(self) -> bool:
        return False
