"""An index as a Qdrant Edge shard inside the replica (`qdrant_edge.EdgeShard`).

Every EdgeShard call holds the GIL for its whole duration, so an HNSW build big enough to
matter would stall the replica: it runs in a child process on a copy of the shard (the
next generation, `shard-NNNNNN/`), and `CURRENT` is switched to the copy. Writes and
optimize share one lock; searches only share a gate that the swap and `close()` take
exclusively. Layout, locking and the measurements behind them (and behind the
`MatchValue(True)` workaround): docs/knowledge.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dify_serving.knowledge.backends.base import (
    INDEXING_THRESHOLD_KB,
    BackendBase,
    RawPoint,
    SearchArgs,
)
from dify_serving.knowledge.errors import StoreError
from dify_serving.knowledge.filters import Condition, MatchAny, Range, StoreFilter, translate
from dify_serving.specs import DifyIndexSpec

log = logging.getLogger(__name__)

#: Seconds between flushes while writes go on (Qdrant's own `flush_interval_sec`). Until a
#: flush the write-ahead log holds every update: a shard of 768 points rewritten 15,000
#: times grew 13 MiB of RSS and 100 MiB of disk without, under 1 MiB and none with it.
FLUSH_INTERVAL_S = 5.0

_OPTIMIZE_CHILD = (
    "import sys, qdrant_edge\n"
    "shard = qdrant_edge.EdgeShard.load(sys.argv[1])\n"
    "shard.optimize()\n"
    "shard.close()\n"
)


class _Gate:
    """Many users of the open shard at once, or one thread replacing/closing it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._exclusive = False

    def _wait_turn(self) -> None:  # with self._cond held
        while self._exclusive:
            self._cond.wait()

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._wait_turn()
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
            self._wait_turn()
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

    if isinstance(condition, Range):
        return qe.FieldCondition(condition.key, range=qe.RangeFloat(**condition.bounds))
    if isinstance(condition, MatchAny):
        return qe.FieldCondition(condition.key, match=qe.MatchAny(list(condition.values)))  # type: ignore[arg-type]
    value = condition.value
    if isinstance(value, bool):  # the binding turns a Python bool into 0/1; numpy's stays one
        value = np.bool_(value)  # type: ignore[assignment]
    return qe.FieldCondition(condition.key, match=qe.MatchValue(value))


def _edge_filter(flt: StoreFilter | None) -> Any:
    import qdrant_edge as qe

    return translate(flt, _edge_condition, qe.Filter)


def _shard_name(generation: int) -> str:
    return f"shard-{generation:06d}"


class QdrantEdgeBackend(BackendBase):
    """An index as a Qdrant Edge shard in `directory` (layout: docs/knowledge.md)."""

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
        self._flushed = time.monotonic()
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
            except Exception as exc:  # the WAL's file lock: one opener per shard
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

        metric = getattr(qe.Distance, distance or self.spec.store.distance)
        scalar = self._scalar_quantization()
        quantization = None
        if scalar is not None:
            quantization = qe.ScalarQuantizationConfig(
                qe.ScalarType.Int8, always_ram=scalar.always_ram
            )
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dimension, distance=metric),
            hnsw_config=qe.HnswIndexConfig(**self._hnsw()),
            quantization_config=quantization,
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self.indexing_threshold_kb),
        )

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.name!r} is closed")

    def _shard_now(self) -> Any:
        self._check_open()
        if self._shard is None:
            raise StoreError(f"collection {self.name!r} does not exist (call ensure first)")
        return self._shard

    def _flush_now_and_then(self, shard: Any) -> None:
        """Flush at most every `FLUSH_INTERVAL_S` while writes go on (the caller holds the
        gate): the write-ahead log keeps every update, in memory and on disk, until a
        flush; Qdrant's server does this on its own, Edge leaves it to us."""
        now = time.monotonic()
        if now - self._flushed >= FLUSH_INTERVAL_S:
            shard.flush()
            self._flushed = now

    # engine calls ------------------------------------------------------------------------
    def _upsert(self, batch: list[RawPoint]) -> None:
        import qdrant_edge as qe

        with self._gate.shared():
            points = [qe.Point(*point) for point in batch]
            shard = self._shard_now()
            shard.update(qe.UpdateOperation.upsert_points(points))
            self._flush_now_and_then(shard)

    def _count(self, flt: StoreFilter | None) -> int:
        import qdrant_edge as qe

        with self._gate.shared():
            return int(
                self._shard_now().count(qe.CountRequest(exact=True, filter=_edge_filter(flt)))
            )

    def _delete(self, flt: StoreFilter) -> None:
        import qdrant_edge as qe

        with self._gate.shared():
            shard = self._shard_now()
            shard.update(qe.UpdateOperation.delete_points_by_filter(_edge_filter(flt)))
            self._flush_now_and_then(shard)

    def _facet(self, flt: StoreFilter, limit: int) -> Iterable[Any]:
        import qdrant_edge as qe

        request = qe.FacetRequest("document_id", limit=limit, exact=True, filter=_edge_filter(flt))
        with self._gate.shared():
            return list(self._shard_now().facet(request))

    def _query(self, rows: np.ndarray, args: SearchArgs) -> list[list[Any]]:
        import qdrant_edge as qe

        params = qe.SearchParams(hnsw_ef=args.ef, exact=args.exact)
        edge_filter = _edge_filter(args.filter)
        requests = [
            qe.QueryRequest(
                limit=args.top_k,
                query=qe.Query.Nearest(row.tolist()),
                filter=edge_filter,
                score_threshold=args.score_threshold,
                with_payload=True,
                with_vector=False,
                params=params,
            )
            for row in rows
        ]
        with self._gate.shared():
            shard = self._shard_now()
            if len(requests) == 1:
                return [shard.query(requests[0])]
            return list(shard.query_batch(qe.QueryBatchRequest(requests)))

    def _stats(self) -> Any:
        if self._shard is None or self._closed:
            return None
        with self._gate.shared():
            return self._shard_now().info()

    # interface ---------------------------------------------------------------------------
    def ensure(self, dimension: int) -> None:
        """Create the shard, or check the existing one's dimension; add missing indexes."""
        import qdrant_edge as qe

        with self._writes:
            self._check_open()
            if self._shard is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self.directory / _shard_name(1)
                shutil.rmtree(path, ignore_errors=True)
                shard = qe.EdgeShard.create(str(path), self._config(dimension))
                with self._gate.exclusive():
                    self._shard, self._generation, self._dimension = shard, 1, dimension
            else:
                self._adopt(self._dimension, dimension)
            with self._gate.shared():
                schema = self._shard.info().payload_schema
                for key in self._missing_indexes(schema):
                    self._shard.update(
                        qe.UpdateOperation.create_field_index(key, qe.PayloadSchemaType.Keyword)
                    )
                for key in self._retired_indexes(schema):
                    self._shard.update(qe.UpdateOperation.delete_field_index(key))
            if not (self.directory / "CURRENT").is_file():
                self._point_to(self._generation)  # the shard exists once CURRENT names it

    def count(self) -> int:
        self._check_open()
        return super().count()

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
        process on a copy of the shard; small shards are optimized in-process.
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

    @contextmanager
    def _shard_closed(self) -> Iterator[None]:
        """Close the shard with writes and searches shut out, then let the caller tidy up."""
        with self._writes, self._gate.exclusive():
            if self._shard is not None:
                self._shard.close()
            self._shard = None
            yield

    def close(self) -> None:
        """Flush and close the shard (idempotent); the store is unusable afterwards."""
        with self._shard_closed():
            self._closed = True

    def drop(self) -> None:
        """Close and delete the whole store directory."""
        with self._shard_closed():
            self._generation, self._dimension = 0, None
            shutil.rmtree(self.directory, ignore_errors=True)
