"""Vector stores: one interface, two backends (Qdrant Edge in-process, a Qdrant server).

Both backends are the Qdrant engine, so scores, filters and HNSW behave alike; the
congruence tests run one suite against both. `EdgeStore` keeps an index on local disk
inside the replica (`qdrant_edge.EdgeShard`); `QdrantServerStore` talks to a Qdrant
server through `qdrant_client` (whose local mode stands in for the server in tests).

Points and replacement. A chunk's point id is a uuid5 of (index, document, position), so
re-upserting a document overwrites its chunks in place. Every point carries the
`version` of the upsert that wrote it; after the new points are written, the document's
points with another version (the old tail when the new text has fewer chunks) are
deleted (counted per document with one facet on `document_id`, removed with one
filtered delete per upsert version). A search running between the two steps may see the
old tail; once `replace_document`/`upsert_many` returns, only the new version is left. A
crash between the steps leaves the stale tail until the document is written again.

Filter language (JSON, several keys = AND):
    {"lang": "en"}                 exact match (string, integer or boolean)
    {"lang": ["en", "de"]}         any of (all strings or all integers)
    {"year": {"gte": 2020, "lt": 2024}}   range (gt/gte/lt/lte, numbers)
`document_id` and `subject_id` address the point's own fields; every other name must be
one of the index's `filterableFields` and addresses the user's metadata, i.e. the
payload key `metadata.<name>`. Unknown names raise `UnknownFilterField`, malformed values
`InvalidFilter`. `build_filter` turns the JSON into a backend-neutral `StoreFilter`
(validated once, at the API edge); each backend translates it.

Payload indexes: keyword indexes on `document_id`, `subject_id`, `version` and on
`metadata.<field>` for each filterable field. Field types are not declared, and a typed
index would change answers (an integer index serves a range from its own entries and
drops float values: {1, 2, 1.5} in [1, 2] gave 2 points, not 3), while integer, boolean
and range conditions on a keyword-indexed field are answered exactly from the payload
(verified on plain and HNSW-indexed segments).

Scores are Qdrant's: similarity for Cosine and Dot (higher is better; `score_threshold`
is a lower bound); for Euclid the score is a distance and the threshold an upper bound.

Qdrant Edge, measured with qdrant-edge-py 0.9.0 (2 CPUs, 384-d float32):
1. Threads. Every EdgeShard call holds the GIL for its whole duration (no GIL release):
   `optimize()` of 50k points took 20.8 s in-process, and for those 20.8 s no other
   Python thread ran (a 1 ms ticker's longest gap: 20.8 s; queries and writes from other
   threads waited up to 20.8 s). Concurrent queries are serialized too (two query threads:
   318 q/s vs. 303 q/s with one; the engine's own search pool still uses both cores).
   Calls from several threads are safe (no errors, consistent results). So HNSW builds
   big enough to matter run in a child process on a copy of the shard, and the copy
   replaces the live shard; the parent kept serving 295 q/s with a longest ticker gap of
   19 ms during that 42 s child optimize (slower because the query loop shared the 2 CPUs).
2. Second opener. A second `EdgeShard.load` of an open path fails, in the same process
   and from another one: "failed to open WAL …: Can't init WAL: Kind(WouldBlock)" (the
   WAL takes a file lock). No silent double-writer; the first opener is unaffected. The
   lock goes with close(), with the object, and with the process.
3. Durability. close() + load() keeps everything; so does SIGKILL without close() or
   flush(): 20k upserts (64-d) + 100 deletes came back exactly from the WAL (load 132 ms
   vs. 69 ms after a flush). SIGKILL during optimize() left a consistent shard (all points,
   nothing indexed); optimize() afterwards finished the job.
4. flush() costs ~100 ms after 50k upserts, ~45 ms after one upsert on a 50k shard,
   ~5 ms after 100, ~2 ms when idle; close() ~25 ms, load() ~70 ms (50k x 384). Nothing
   here flushes per write: the WAL already makes writes durable.
5. Quirk: `qdrant_edge.MatchValue(True)` arrives as the integer 1 (the binding extracts a
   Python bool as an int) and never matches a JSON `true`; a `numpy.bool_` arrives as a
   boolean, so that is what `EdgeStore` sends.
Nothing is indexed until `optimize()`: new points sit in appendable segments and are
searched exactly (~3 ms per query at 50k x 384; ~0.8 ms once indexed), and a segment
gets its HNSW graph only once it holds `indexing_threshold_kb` of vectors.

Embedded layout and concurrency. `home/indexes/<collection>/` (what the operator reclaims)
holds `CURRENT`, the name of the live shard directory, and that directory,
`shard-NNNNNN/`. An optimize that would build HNSW flushes the shard, copies it to the
next generation, optimizes the copy in a child process, loads it, switches `CURRENT`
(atomic rename) and closes the old shard; at start, directories `CURRENT` does not name
are leftovers of an interrupted create or optimize and are removed. Small shards (below
the indexing threshold, where optimize only merges segments) are optimized in-process,
which is cheap. Writes and optimize are serialized by one lock (a write waits while the
child works); searches never take it, they only share a gate that the shard swap and
`close()` take exclusively (for the ~0.1 s a swap needs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dify_serving.specs import DifyIndexSpec

log = logging.getLogger("dify_serving.stores")

#: Vectors (KB) a segment must hold before Qdrant builds its HNSW graph.
INDEXING_THRESHOLD_KB = 10_000
#: Below this many KB of matching vectors a filtered search scans instead of using HNSW.
FULL_SCAN_THRESHOLD_KB = 10_000
#: Points per engine call: bounds request size (server) and GIL hold time (embedded).
UPSERT_BATCH = 1024
#: Fields of every point that filters may address directly (not under `metadata`).
POINT_FIELDS = ("document_id", "subject_id")
#: Keyword indexes every collection gets.
INDEXED_FIELDS = ("document_id", "subject_id", "version")

_ID_NAMESPACE = uuid.UUID("5b0c7f0e-3d55-4a8e-9a52-6a2f4d1c9e17")
_RANGE_OPS = ("gt", "gte", "lt", "lte")
_OPTIMIZE_CHILD = (
    "import sys, qdrant_edge\n"
    "shard = qdrant_edge.EdgeShard.load(sys.argv[1])\n"
    "shard.optimize()\n"
    "shard.close()\n"
)


# ---- errors -----------------------------------------------------------------------------
class StoreError(Exception):
    """A vector store refused or failed an operation."""


class DimensionMismatch(StoreError):
    """Vectors of one size met a collection holding another."""

    def __init__(self, collection: str, existing: int, requested: int) -> None:
        super().__init__(
            f"collection {collection!r} holds {existing}-dimensional vectors; "
            f"got {requested}-dimensional ones"
        )
        self.existing = existing
        self.requested = requested


class UnknownFilterField(StoreError):
    """A filter names a field that is not filterable."""

    def __init__(self, field: str, allowed: set[str] | frozenset[str]) -> None:
        super().__init__(
            f"unknown filter field {field!r}; filterable fields: {', '.join(sorted(allowed))}"
        )
        self.field = field
        self.allowed = frozenset(allowed)


class InvalidFilter(StoreError):
    """A filter value is malformed."""


# ---- points and hits --------------------------------------------------------------------
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
    """The stable point id of a document's chunk (uuid5)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{index}\x1f{document_id}\x1f{chunk_index}"))


# ---- filters ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Match:
    key: str
    value: str | int | bool


@dataclass(frozen=True, slots=True)
class MatchAny:
    key: str
    values: tuple[str, ...] | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Range:
    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


Condition = Match | MatchAny | Range


@dataclass(frozen=True, slots=True)
class StoreFilter:
    """Conditions on payload keys: all of `must`, none of `must_not`."""

    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


def payload_key(field: str) -> str:
    """Where a filter field lives in the payload."""
    return field if field in POINT_FIELDS else f"metadata.{field}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _condition(field: str, value: Any) -> Condition:
    key = payload_key(field)
    if isinstance(value, str | int | bool):
        return Match(key, value)
    if isinstance(value, list | tuple):
        if not value:
            raise InvalidFilter(f"{field}: an empty list matches nothing")
        if all(isinstance(v, str) for v in value):
            return MatchAny(key, tuple(value))
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return MatchAny(key, tuple(value))
        raise InvalidFilter(f"{field}: a list must hold only strings or only integers")
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in _RANGE_OPS)
        if unknown or not value:
            raise InvalidFilter(
                f"{field}: a range takes {', '.join(_RANGE_OPS)}; got {unknown or 'nothing'}"
            )
        if not all(_is_number(v) for v in value.values()):
            raise InvalidFilter(f"{field}: range bounds must be numbers")
        return Range(key, **{op: float(v) for op, v in value.items()})
    if isinstance(value, float):
        raise InvalidFilter(f"{field}: exact match needs a string, integer or boolean")
    raise InvalidFilter(f"{field}: unsupported value {value!r}")


def build_filter(
    filter: Mapping[str, Any] | None, allowed: set[str] | frozenset[str]
) -> StoreFilter | None:
    """Validate the user's JSON filter against `allowed` fields; None when empty."""
    if filter is None:
        return None
    if not isinstance(filter, Mapping):
        raise InvalidFilter("a filter is an object of field: condition")
    conditions = []
    for name, value in filter.items():
        if name not in allowed:
            raise UnknownFilterField(str(name), allowed)
        conditions.append(_condition(name, value))
    return StoreFilter(must=tuple(conditions)) if conditions else None


# ---- the interface ----------------------------------------------------------------------
FilterArg = Mapping[str, Any] | StoreFilter | None


@runtime_checkable
class VectorStore(Protocol):
    """What the index deployment needs from a backend; `EdgeStore`, `QdrantServerStore`."""

    name: str

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


class _Store:
    """What both backends share; they supply the engine calls (`_put`, `_query`, …)."""

    def __init__(self, name: str, spec: DifyIndexSpec) -> None:
        self.name = name
        self.spec = spec
        self.allowed_fields = frozenset({*POINT_FIELDS, *spec.filterable_fields})
        self._writes = threading.Lock()
        self._dimension: int | None = None

    # engine calls --------------------------------------------------------------------
    def _put(self, points: list[ChunkPoint]) -> None:
        raise NotImplementedError

    def _count(self, flt: StoreFilter | None) -> int:
        raise NotImplementedError

    def _delete(self, flt: StoreFilter) -> None:
        raise NotImplementedError

    def _per_document(self, flt: StoreFilter, limit: int) -> dict[str, int]:
        raise NotImplementedError

    def _query(
        self,
        rows: np.ndarray,
        top_k: int,
        flt: StoreFilter | None,
        score_threshold: float | None,
        exact: bool,
    ) -> list[list[Hit]]:
        raise NotImplementedError

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

    def _ef(self, top_k: int) -> int:
        return max(self.spec.store.hnsw.ef, top_k)

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
        with self._writes:
            self._put([point for points in latest.values() for point in points])
            for flt in stale:
                counts = self._per_document(flt, limit=len(latest))
                if counts:
                    self._delete(flt)
                    removed.update(counts)
        return removed

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
        return self._query(rows, top_k, flt, score_threshold, exact) if len(rows) else []

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

    def needs_optimize(self) -> bool:
        return False

    def optimize(self) -> bool:
        return False


# ---- embedded: Qdrant Edge --------------------------------------------------------------
class _Gate:
    """Many users of the open shard at once, or one thread replacing/closing it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if not self._users:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._users:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _edge_condition(condition: Condition) -> Any:
    import qdrant_edge as qe

    if isinstance(condition, Match):
        value = condition.value
        if isinstance(value, bool):  # a Python bool would arrive as 0/1 (see module notes)
            value = np.bool_(value)  # type: ignore[assignment]
        return qe.FieldCondition(condition.key, match=qe.MatchValue(value))
    if isinstance(condition, MatchAny):
        return qe.FieldCondition(condition.key, match=qe.MatchAny(list(condition.values)))  # type: ignore[arg-type]
    bounds = qe.RangeFloat(gt=condition.gt, gte=condition.gte, lt=condition.lt, lte=condition.lte)
    return qe.FieldCondition(condition.key, range=bounds)


def _edge_filter(flt: StoreFilter | None) -> Any:
    import qdrant_edge as qe

    if flt is None:
        return None
    return qe.Filter(
        must=[_edge_condition(c) for c in flt.must] or None,
        must_not=[_edge_condition(c) for c in flt.must_not] or None,
    )


def _shard_name(generation: int) -> str:
    return f"shard-{generation:06d}"


class EdgeStore(_Store):
    """An index as a Qdrant Edge shard in `directory` (see the module notes on layout)."""

    def __init__(
        self,
        directory: Path,
        name: str,
        spec: DifyIndexSpec,
        *,
        indexing_threshold_kb: int = INDEXING_THRESHOLD_KB,
        optimize_in_subprocess: bool = True,
    ) -> None:
        super().__init__(name, spec)
        self.directory = Path(directory)
        self.indexing_threshold_kb = indexing_threshold_kb
        self.optimize_in_subprocess = optimize_in_subprocess
        self._gate = _Gate()
        self._shard: Any = None
        self._generation = 0
        self._closed = False
        self._open_existing()

    # layout ------------------------------------------------------------------------------
    @property
    def shard_path(self) -> Path | None:
        """The live shard directory, if any."""
        return self.directory / _shard_name(self._generation) if self._generation else None

    def _open_existing(self) -> None:
        import qdrant_edge as qe

        current = self.directory / "CURRENT"
        live = current.read_text().strip() if current.is_file() else None
        if live:
            path = self.directory / live
            dimension, distance = self._persisted_vectors(path)
            if distance != self.spec.store.distance:
                log.warning(
                    "collection %s uses %s distance; the spec asks %s (kept: fixed at creation)",
                    self.name,
                    distance,
                    self.spec.store.distance,
                )
            try:  # with the spec's HNSW/quantization/threshold: they apply to future builds
                self._shard = qe.EdgeShard.load(str(path), self._config(dimension, distance))
            except Exception as exc:
                if "WouldBlock" in str(exc):
                    raise StoreError(f"shard {path} is open in another process") from exc
                raise StoreError(f"cannot load shard {path}: {exc}") from exc
            self._generation = int(live.rsplit("-", 1)[1])
            self._dimension = dimension
        if self.directory.is_dir():  # leftovers of an interrupted create or optimize
            for entry in self.directory.glob("shard-*"):
                if entry.name != live:
                    shutil.rmtree(entry, ignore_errors=True)

    @staticmethod
    def _persisted_vectors(path: Path) -> tuple[int, str]:
        """(size, distance) of the default vector, from the shard's own config file."""
        try:
            params = json.loads((path / "edge_config.json").read_text())["vectors"][""]
            return int(params["size"]), str(params["distance"])
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot read the vector config of shard {path}: {exc}") from exc

    def _point_to(self, generation: int) -> None:
        tmp = self.directory / "CURRENT.tmp"
        with open(tmp, "w") as handle:
            handle.write(_shard_name(generation))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.directory / "CURRENT")

    def _config(self, dimension: int, distance: str | None = None) -> Any:
        import qdrant_edge as qe

        store = self.spec.store
        metric = getattr(qe.Distance, distance or store.distance)
        quantization = None
        if store.quantization is not None and store.quantization.scalar:
            quantization = qe.ScalarQuantizationConfig(
                qe.ScalarType.Int8, always_ram=store.quantization.always_ram
            )
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dimension, distance=metric),
            hnsw_config=qe.HnswIndexConfig(
                m=store.hnsw.m,
                ef_construct=store.hnsw.ef_construct,
                full_scan_threshold=FULL_SCAN_THRESHOLD_KB,
            ),
            quantization_config=quantization,
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self.indexing_threshold_kb),
        )

    def _shard_now(self) -> Any:
        if self._closed:
            raise StoreError(f"store {self.name!r} is closed")
        if self._shard is None:
            raise StoreError(f"collection {self.name!r} does not exist (call ensure first)")
        return self._shard

    # interface ---------------------------------------------------------------------------
    def ensure(self, dimension: int) -> None:
        """Create the shard, or check the existing one's dimension; add missing indexes."""
        import qdrant_edge as qe

        with self._writes:
            if self._closed:
                raise StoreError(f"store {self.name!r} is closed")
            if self._shard is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self.directory / _shard_name(1)
                shutil.rmtree(path, ignore_errors=True)
                shard = qe.EdgeShard.create(str(path), self._config(dimension))
                with self._gate.exclusive():
                    self._shard, self._generation, self._dimension = shard, 1, dimension
            elif self._dimension != dimension:
                raise DimensionMismatch(self.name, self._dimension or 0, dimension)
            with self._gate.shared():
                known = set(self._shard.info().payload_schema)
                wanted = [*INDEXED_FIELDS, *(payload_key(f) for f in self.spec.filterable_fields)]
                for key in dict.fromkeys(wanted):
                    if key not in known:
                        self._shard.update(
                            qe.UpdateOperation.create_field_index(key, qe.PayloadSchemaType.Keyword)
                        )
            if not (self.directory / "CURRENT").is_file():
                self._point_to(self._generation)  # the shard exists once CURRENT names it

    def _put(self, points: list[ChunkPoint]) -> None:
        import qdrant_edge as qe

        with self._gate.shared():
            shard = self._shard_now()
            for at in range(0, len(points), UPSERT_BATCH):
                batch = [
                    qe.Point(
                        p.id,
                        np.asarray(p.vector, dtype=np.float32).tolist(),
                        dict(p.payload),
                    )
                    for p in points[at : at + UPSERT_BATCH]
                ]
                shard.update(qe.UpdateOperation.upsert_points(batch))

    def _count(self, flt: StoreFilter | None) -> int:
        import qdrant_edge as qe

        with self._gate.shared():
            return int(
                self._shard_now().count(qe.CountRequest(exact=True, filter=_edge_filter(flt)))
            )

    def _delete(self, flt: StoreFilter) -> None:
        import qdrant_edge as qe

        with self._gate.shared():
            self._shard_now().update(qe.UpdateOperation.delete_points_by_filter(_edge_filter(flt)))

    def _per_document(self, flt: StoreFilter, limit: int) -> dict[str, int]:
        import qdrant_edge as qe

        request = qe.FacetRequest("document_id", limit=limit, exact=True, filter=_edge_filter(flt))
        with self._gate.shared():
            return {str(h.value): int(h.count) for h in self._shard_now().facet(request)}

    def _query(
        self,
        rows: np.ndarray,
        top_k: int,
        flt: StoreFilter | None,
        score_threshold: float | None,
        exact: bool,
    ) -> list[list[Hit]]:
        import qdrant_edge as qe

        params = qe.SearchParams(hnsw_ef=self._ef(top_k), exact=exact)
        edge_filter = _edge_filter(flt)
        requests = [
            qe.QueryRequest(
                limit=top_k,
                query=qe.Query.Nearest(row.tolist()),
                filter=edge_filter,
                score_threshold=score_threshold,
                with_payload=True,
                with_vector=False,
                params=params,
            )
            for row in rows
        ]
        with self._gate.shared():
            shard = self._shard_now()
            if len(requests) == 1:
                results = [shard.query(requests[0])]
            else:
                results = shard.query_batch(qe.QueryBatchRequest(requests))
        return [
            [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in points]
            for points in results
        ]

    def count(self) -> int:
        if self._closed:
            raise StoreError(f"store {self.name!r} is closed")
        return super().count()

    def info(self) -> StoreInfo:
        if self._shard is None or self._closed:
            return StoreInfo(0, 0, 0)
        with self._gate.shared():
            raw = self._shard_now().info()
        return StoreInfo(
            int(raw.points_count), int(raw.indexed_vectors_count), int(raw.segments_count)
        )

    def _kb(self, points: int) -> float:
        return points * (self._dimension or 0) * 4 / 1024

    def needs_optimize(self) -> bool:
        """Whether `optimize()` would do real work: several segments to merge in a small
        shard, or enough unindexed vectors in a big one for a new HNSW graph (a smaller
        unindexed tail is cheap to search exactly and is left alone)."""
        info = self.info()
        if self._kb(info.points) < self.indexing_threshold_kb:
            return info.segments > 1
        return self._kb(info.unindexed) >= self.indexing_threshold_kb

    def optimize(self) -> bool:
        """Merge segments and build HNSW graphs; True if anything changed.

        Holds the write lock throughout. Searches continue: an HNSW build runs in a child
        process on a copy (see module notes); small shards are optimized in-process.
        """
        with self._writes:
            if self._shard is None or self._closed or not self.needs_optimize():
                return False
            small = self._kb(self.info().points) < self.indexing_threshold_kb
            if small or not self.optimize_in_subprocess:
                with self._gate.shared():
                    return bool(self._shard_now().optimize())
            self._optimize_aside()
            return True

    def _optimize_aside(self) -> None:
        import qdrant_edge as qe

        source = self.shard_path
        assert source is not None
        generation = self._generation + 1
        target = self.directory / _shard_name(generation)
        with self._gate.shared():
            self._shard_now().flush()
        shutil.rmtree(target, ignore_errors=True)
        try:
            shutil.copytree(source, target)
            child = subprocess.run(
                [sys.executable, "-c", _OPTIMIZE_CHILD, str(target)],
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode:
                raise StoreError(f"optimizer process failed: {child.stderr.strip()[-500:]}")
            fresh = qe.EdgeShard.load(str(target))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        with self._gate.exclusive():
            try:
                self._point_to(generation)
            except BaseException:
                fresh.close()
                shutil.rmtree(target, ignore_errors=True)
                raise
            old, self._shard, self._generation = self._shard, fresh, generation
            old.close()
        shutil.rmtree(source, ignore_errors=True)

    def close(self) -> None:
        """Flush and close the shard (idempotent); the store is unusable afterwards."""
        with self._writes, self._gate.exclusive():
            if self._shard is not None:
                self._shard.close()
            self._shard, self._closed = None, True

    def drop(self) -> None:
        """Close and delete the whole store directory."""
        with self._writes, self._gate.exclusive():
            if self._shard is not None:
                self._shard.close()
            self._shard, self._generation, self._dimension = None, 0, None
            shutil.rmtree(self.directory, ignore_errors=True)


# ---- server: qdrant_client --------------------------------------------------------------
def _client_condition(condition: Condition) -> Any:
    from qdrant_client import models

    if isinstance(condition, Match):
        return models.FieldCondition(
            key=condition.key, match=models.MatchValue(value=condition.value)
        )
    if isinstance(condition, MatchAny):
        return models.FieldCondition(
            key=condition.key, match=models.MatchAny(any=list(condition.values))
        )
    bounds = models.Range(gt=condition.gt, gte=condition.gte, lt=condition.lt, lte=condition.lte)
    return models.FieldCondition(key=condition.key, range=bounds)


def _client_filter(flt: StoreFilter | None) -> Any:
    from qdrant_client import models

    if flt is None:
        return None
    return models.Filter(
        must=[_client_condition(c) for c in flt.must] or None,
        must_not=[_client_condition(c) for c in flt.must_not] or None,
    )


class QdrantServerStore(_Store):
    """An index as a collection of a Qdrant server (the store owns `client`).

    qdrant_client's local mode (`QdrantClient(location=":memory:")` or `path=`) works too;
    it searches exactly and has no payload indexes, so those settings are not sent there.
    """

    def __init__(self, client: Any, name: str, spec: DifyIndexSpec) -> None:
        super().__init__(name, spec)
        self.client = client
        options = getattr(client, "init_options", None) or {}
        self.local = options.get("location") == ":memory:" or options.get("path") is not None
        self._dimension = self._existing_dimension()

    def _existing_dimension(self) -> int | None:
        if not self.client.collection_exists(self.name):
            return None
        vectors = self.client.get_collection(self.name).config.params.vectors
        if vectors is None or isinstance(vectors, dict):
            raise StoreError(f"collection {self.name!r} does not have one unnamed dense vector")
        return int(vectors.size)

    def ensure(self, dimension: int) -> None:
        """Create the collection, or check the existing one's dimension; add missing indexes."""
        from qdrant_client import models

        store = self.spec.store
        with self._writes:
            existing = self._existing_dimension()
            if existing is None:
                quantization = None
                if store.quantization is not None and store.quantization.scalar:
                    quantization = models.ScalarQuantization(
                        scalar=models.ScalarQuantizationConfig(
                            type=models.ScalarType.INT8,
                            always_ram=store.quantization.always_ram,
                        )
                    )
                try:
                    self.client.create_collection(
                        self.name,
                        vectors_config=models.VectorParams(
                            size=dimension, distance=models.Distance(store.distance)
                        ),
                        hnsw_config=models.HnswConfigDiff(
                            m=store.hnsw.m,
                            ef_construct=store.hnsw.ef_construct,
                            full_scan_threshold=FULL_SCAN_THRESHOLD_KB,
                        ),
                        quantization_config=quantization,
                    )
                except Exception:  # another replica may have created it meanwhile
                    existing = self._existing_dimension()
                    if existing is None:
                        raise
            if existing is not None and existing != dimension:
                self._dimension = existing
                raise DimensionMismatch(self.name, existing, dimension)
            self._dimension = dimension
            if self.local:
                return
            known = set(self.client.get_collection(self.name).payload_schema or {})
            wanted = [*INDEXED_FIELDS, *(payload_key(f) for f in self.spec.filterable_fields)]
            for key in dict.fromkeys(wanted):
                if key not in known:
                    self.client.create_payload_index(
                        self.name, key, models.PayloadSchemaType.KEYWORD, wait=True
                    )

    def _put(self, points: list[ChunkPoint]) -> None:
        from qdrant_client import models

        for at in range(0, len(points), UPSERT_BATCH):
            batch = [
                models.PointStruct(
                    id=p.id,
                    vector=np.asarray(p.vector, dtype=np.float32).tolist(),
                    payload=dict(p.payload),
                )
                for p in points[at : at + UPSERT_BATCH]
            ]
            self.client.upsert(self.name, points=batch, wait=True)

    def _count(self, flt: StoreFilter | None) -> int:
        result = self.client.count(self.name, count_filter=_client_filter(flt), exact=True)
        return int(result.count)

    def _delete(self, flt: StoreFilter) -> None:
        from qdrant_client import models

        selector = models.FilterSelector(filter=_client_filter(flt))
        self.client.delete(self.name, points_selector=selector, wait=True)

    def _per_document(self, flt: StoreFilter, limit: int) -> dict[str, int]:
        response = self.client.facet(
            self.name, "document_id", facet_filter=_client_filter(flt), limit=limit, exact=True
        )
        return {str(h.value): int(h.count) for h in response.hits}

    def _query(
        self,
        rows: np.ndarray,
        top_k: int,
        flt: StoreFilter | None,
        score_threshold: float | None,
        exact: bool,
    ) -> list[list[Hit]]:
        from qdrant_client import models

        params = None if self.local else models.SearchParams(hnsw_ef=self._ef(top_k), exact=exact)
        requests = [
            models.QueryRequest(
                query=row.tolist(),
                filter=_client_filter(flt),
                limit=top_k,
                params=params,
                score_threshold=score_threshold,
                with_payload=True,
            )
            for row in rows
        ]
        responses = self.client.query_batch_points(self.name, requests=requests)
        return [
            [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]
            for response in responses
        ]

    def info(self) -> StoreInfo:
        if self._dimension is None:
            return StoreInfo(0, 0, 0)
        raw = self.client.get_collection(self.name)
        return StoreInfo(
            int(raw.points_count or 0),
            int(raw.indexed_vectors_count or 0),
            int(raw.segments_count or 0),
        )

    def close(self) -> None:
        self.client.close()

    def drop(self) -> None:
        """Delete the collection."""
        with self._writes:
            self.client.delete_collection(self.name)
            self._dimension = None


# ---- factory ----------------------------------------------------------------------------
def open_store(
    index_name: str,
    spec: DifyIndexSpec,
    home: Path,
    qdrant_url: str | None = None,
    *,
    client: Any = None,
) -> VectorStore:
    """The store an index's spec asks for.

    `store.type: qdrant` uses `store.url`; an embedded index uses the `qdrant_url` setting
    when one is given, else a Qdrant Edge shard under `home/indexes/<collection>`.
    `client` injects a ready `QdrantClient` (tests: local mode).
    """
    collection = spec.store.collection or index_name
    url = spec.store.url if spec.store.type == "qdrant" else qdrant_url
    if client is None and url:
        from qdrant_client import QdrantClient

        client = QdrantClient(url=url, timeout=30)
    if client is not None:
        return QdrantServerStore(client, collection, spec)
    return EdgeStore(Path(home) / "indexes" / collection, collection, spec)
