"""The index deployment: one `IndexServer` app per DifyIndex, the one writer of its collection.

The gateway validates the wire format; this replica does the data work: clean → chunk
(by the embedding model's own tokenizer) → embed → store, and search/delete. Chunks are
embedded from the token ids the chunker cut (`ModelServer.embed_tokens`), so the text is
tokenized once and what is stored is exactly what the model saw.

A request is all-or-nothing for the index: every document is cleaned, chunked and
embedded before anything is written, so a bad document or a failed embedding leaves the
collection as it was. Writes are serialized; searches run beside them. Qdrant Edge
builds its HNSW graph only when asked, so a debounced background `optimize()` follows
bursts of writes (until then new points are searched exactly, which is correct, only
slower).

An embedded shard is a directory that one process may own: the replica takes an
exclusive `flock` beside it (waiting while a replica being replaced lets go).

Refusals are `DifyError`s and leave the replica as they are (a `DimensionMismatch` is a
409, a bad filter a 422 by its own class): the gateway maps every one in one place.

Searches are cached here, in the replica, not in the gateway: this replica is the one
writer of its collection, so it knows the moment an answer goes stale. Every write
(upsert, delete, subject erasure) bumps a write version and empties the cache before it
returns, and the version is in every key, so a search that began before the write
cannot keep its answer afterwards: erased text is never answered from the cache. An
in-process LRU (`tasks/cache.py`) is exact for that reason even in a cluster (one
replica per index), where a shared cache would need the version shared too. Its bound is
a share of the gateway's (`INDEX_CACHE_SHARE`): each index replica is a process of its own.

Its figures (points, searches by cache outcome, upserts, deletes, latencies; the index
name as the only label) are pushed to the metrics hub for `GET /v1/metrics`
(`telemetry.IndexTelemetry`).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import time
import uuid
from pathlib import Path
from typing import IO, Any

from ray import serve

from dify_serving.engines.base import inline_or_thread
from dify_serving.errors import DifyError
from dify_serving.knowledge.backends import open_backend
from dify_serving.knowledge.chunking import Chunker
from dify_serving.knowledge.cleaning import clean_text, dedupe
from dify_serving.knowledge.errors import DimensionMismatch
from dify_serving.knowledge.filters import StoreFilter, build_filter
from dify_serving.knowledge.points import ChunkPoint, point_id
from dify_serving.layout import index_shard_lock
from dify_serving.options import CacheOptions, ModelSourceOptions
from dify_serving.render import model_app_name
from dify_serving.specs import DifyIndexSpec, DifyModelSpec, store_address
from dify_serving.tasks.cache import LocalCache, cache_key, model_tag
from dify_serving.telemetry import IndexTelemetry

log = logging.getLogger(__name__)

#: Seconds without writes before the background optimizer builds the HNSW graph.
OPTIMIZE_AFTER_S = 2.0
#: Seconds a new replica waits for the one it replaces to release the shard.
LOCK_WAIT_S = 120.0
#: Rows per embedding call: several calls in flight keep the model's batches full.
EMBED_SLICE = 64
#: Embedding calls one request keeps in flight: enough to keep the model's compute
#: threads busy, few enough that a 10 MB document (thousands of chunks) does not fill
#: the model's bounded queue and crowd out everyone else.
EMBED_IN_FLIGHT = 8
#: An index replica's search cache holds this share of the gateway's cache bound.
INDEX_CACHE_SHARE = 4
#: Seconds an erasure is remembered against upserts that began before it (longer than
#: any upsert takes: its call's timeout is the gateway's request timeout, 300 s).
ERASED_FOR_S = 900.0


class IndexServer:
    #: The search cache (module docstring); None: off (a TTL of 0).
    cache: LocalCache | None = None
    #: Bumped by every write: part of every search's cache key.
    write_version = 0

    def __init__(
        self,
        name: str,
        spec: dict[str, Any],
        model: dict[str, Any],
        home: str,
        qdrant_url: str | None = None,
        sources: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from dify_serving.engines.weights import resolve

        self.name = name
        self.spec = DifyIndexSpec.model_validate(spec)
        self.model_name: str = model["name"]
        model_spec = DifyModelSpec.model_validate(model["spec"])
        allowed = ModelSourceOptions.model_validate(sources or {})
        path = resolve(model_spec.model_id, Path(home), allowed, model_spec.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_spec.revision)
        config = AutoConfig.from_pretrained(path, revision=model_spec.revision)
        self.dimension = int(config.hidden_size)
        positions = int(getattr(config, "max_position_embeddings", 512))
        self.token_limit = int(min(tokenizer.model_max_length, positions))
        self.tokenizer = tokenizer
        self.chunker = Chunker(
            tokenizer,
            max_tokens=min(self.spec.chunking.max_tokens, self.token_limit),
            overlap=self.spec.chunking.overlap,
        )
        on_disk = store_address(self.spec, qdrant_url) is None
        self._lock_file = _take_shard_lock(Path(home), self.collection) if on_disk else None
        self.backend = open_backend(name, self.spec, Path(home), qdrant_url)
        self.mismatch: DimensionMismatch | None = None
        try:
            self.backend.ensure(self.dimension)
        except DimensionMismatch as exc:  # keep answering: every data call says 409 and why
            self.mismatch = exc
            log.error("index %s: %s", name, exc)
        self._embedder: Any = None
        caching = CacheOptions.model_validate(cache or {})
        if caching.ttl_s > 0:
            self.cache = LocalCache(caching.max_bytes // INDEX_CACHE_SHARE, caching.ttl_s)
        self._model_tag = model_tag(self.model_name, model_spec)
        self._writes = asyncio.Lock()
        self._last_write = 0.0
        self._optimizer: asyncio.Task[None] | None = None
        #: subject → (write version of its erasure, when): an upsert that began before
        #: the erasure writes none of that subject's documents (see `upsert`)
        self._erased: dict[str, tuple[int, float]] = {}
        self._counted: tuple[int, int] | None = None  # (write version, points) for metrics
        self.telemetry = IndexTelemetry(name, self._points)
        self.telemetry.pusher.start()

    def _points(self) -> int | None:
        """Points stored, counted again only after a write (read by the metrics push)."""
        if self.mismatch is not None:
            return None
        version = self.write_version
        if self._counted is None or self._counted[0] != version:
            self._counted = (version, int(self.backend.count()))
        return self._counted[1]

    @property
    def collection(self) -> str:
        return self.spec.store.collection or self.name

    # ---- helpers ------------------------------------------------------------------
    def _check(self) -> None:
        if self.mismatch is not None:  # a new one each time: a re-raised error grows its traceback
            m = self.mismatch
            raise DimensionMismatch(self.backend.name, m.existing, m.requested)

    def _filter(self, raw: dict[str, Any] | None) -> StoreFilter | None:
        return build_filter(raw, self.backend.allowed_fields)

    async def _embed(self, rows: list[list[int]]) -> Any:
        import numpy as np

        if self._embedder is None:
            self._embedder = serve.get_deployment_handle(
                "ModelServer", app_name=model_app_name(self.model_name)
            )
        embedder = self._embedder
        try:
            if len(rows) <= EMBED_SLICE:  # a query, a small document: one call
                parts = [await embedder.embed_tokens.remote(rows)] if rows else []
            else:
                parts = await _sliced(embedder, rows)
        except Exception as exc:
            self._embedder = None
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DifyError):
                raise cause from None
            log.warning(  # the details stay here: transport text means nothing to a client
                "index %s: embedding model %s failed: %s: %s",
                self.name,
                self.model_name,
                type(exc).__name__,
                str(exc)[:500],
            )
            raise DifyError(
                503,
                "model_unavailable",
                f"embedding model {self.model_name!r} did not answer; retry shortly",
            ) from None
        return np.concatenate(parts) if parts else np.zeros((0, self.dimension), np.float32)

    # ---- data ----------------------------------------------------------------------
    def _prepare(self, documents: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[Any]]]:
        """Clean and chunk every document; refuse the request if any has no text left."""
        cleaned = [clean_text(doc["text"], self.spec.cleaning) for doc in documents]
        for doc, text in zip(documents, cleaned, strict=True):
            if not text.strip():
                raise DifyError(
                    422, "empty_document", f"document {doc['id']!r} has no text after cleaning"
                )
        return list(zip(documents, self._split(cleaned), strict=True))

    def _split(self, cleaned: list[str]) -> list[list[Any]]:
        """Chunk cleaned texts, dropping repeated chunks when the spec asks to."""
        out = self.chunker.split_many(cleaned)
        if self.spec.cleaning.deduplicate:
            out = [[chunks[i] for i in dedupe(c.text for c in chunks)] for chunks in out]
        return out

    async def upsert(self, documents: list[dict[str, Any]]) -> dict[str, Any]:
        """`_upsert`, counted (calls, chunks written, time)."""
        started = time.perf_counter()
        try:
            result = await self._upsert(documents)
        except BaseException:
            self.telemetry.errors.labels(self.name, "upsert").inc()
            raise
        self.telemetry.upserts.inc()
        self.telemetry.upserted_chunks.inc(sum(d["chunks"] for d in result["documents"]))
        self.telemetry.upsert_seconds.observe(time.perf_counter() - started)
        return result

    async def _upsert(self, documents: list[dict[str, Any]]) -> dict[str, Any]:
        """Replace each document's chunks; all documents are embedded before any write.

        An erasure that lands while this upsert embeds wins: the documents about an erased
        subject are left out of the write (and listed as `erased`), so a subject erased
        during a bulk ingestion never comes back from the step that was in flight.
        """
        self._check()
        began = self.write_version
        prepared = await asyncio.to_thread(self._prepare, documents)
        rows = [chunk.ids for _, chunks in prepared for chunk in chunks]
        vectors = await self._embed(rows)
        version = uuid.uuid4().hex
        batch, at = [], 0
        for doc, chunks in prepared:
            points = []
            for position, chunk in enumerate(chunks):
                payload = {
                    "document_id": doc["id"],
                    "chunk_index": position,
                    "text": chunk.text,
                    "start": chunk.start,
                    "end": chunk.end,
                    "tokens": len(chunk.ids),
                    "subject_id": doc.get("subject_id"),
                    "metadata": doc.get("metadata") or {},
                    "version": version,
                }
                pid = point_id(self.collection, doc["id"], position)
                points.append(ChunkPoint(pid, vectors[at], payload))
                at += 1
            batch.append((doc["id"], points))
        async with self._writes:
            late = {s for s, (version, _) in self._erased.items() if version > began}
            erased = [doc["id"] for doc, _ in prepared if doc.get("subject_id") in late]
            if erased:
                batch = [(doc_id, points) for doc_id, points in batch if doc_id not in erased]
            try:
                replaced = await asyncio.to_thread(self.backend.upsert_many, batch)
            finally:  # even a failed write may have changed something
                self._wrote()
        self._schedule_optimize()
        return {
            "index": self.name,
            "erased": erased,
            "documents": [
                {
                    "id": doc_id,
                    "chunks": len(points),
                    "stale_chunks_removed": replaced.get(doc_id, 0),
                }
                for doc_id, points in batch
            ],
            "chunks": len(rows),
            "tokens": sum(len(r) for r in rows),
        }

    async def search(self, request: dict[str, Any]) -> dict[str, Any]:
        """Nearest chunks; `request["cache"]` (scope, read, keep) is the gateway's say over
        the cache, and the answer's `cache` says HIT or MISS (None when it is off)."""
        started = time.perf_counter()
        try:
            answer = await self._search_cached(request)
        except BaseException:
            self.telemetry.errors.labels(self.name, "search").inc()
            raise
        self.telemetry.searched(answer.get("cache"), time.perf_counter() - started)
        return answer

    async def _search_cached(self, request: dict[str, Any]) -> dict[str, Any]:
        self._check()
        wishes = request.get("cache") or {}
        request = {k: v for k, v in request.items() if k != "cache"}
        if self.cache is None:
            return {**await self._search(request), "cache": None}
        version = self.write_version
        key = cache_key(
            "search",
            self.name,
            self.collection,
            version,
            self._model_tag,
            request,
            wishes.get("scope", "-"),
        )
        if wishes.get("read", True):
            cached = self.cache.lookup(key)
            if cached is not None:
                return {**json.loads(cached), "cache": "HIT"}
        result = await self._search(request)
        if wishes.get("keep", True) and version == self.write_version:  # nothing written since
            try:
                self.cache.store(key, json.dumps(result).encode())
            except (TypeError, ValueError) as exc:  # a payload JSON cannot hold: not kept
                log.warning("index %s: search answer not cached: %s", self.name, exc)
        return {**result, "cache": "MISS"}

    async def _search(self, request: dict[str, Any]) -> dict[str, Any]:
        flt = self._filter(request.get("filter"))
        vector = request.get("vector")
        tokens = 0
        if vector is None:
            query = request["query"]
            row = await inline_or_thread(len(query), self._query_ids, query)
            tokens = len(row)
            vector = (await self._embed([row]))[0]
        elif len(vector) != self.dimension:
            raise DifyError(
                422,
                "invalid_request",
                f"vector: has {len(vector)} dimensions; index {self.name!r} holds {self.dimension}",
            )
        args = (vector, request.get("top_k", 10), flt, request.get("score_threshold"))
        if self.backend.blocking_io:  # a server round trip: the loop serves others meanwhile
            hits = await asyncio.to_thread(self.backend.search, *args)
        else:  # an Edge call holds the GIL throughout: a thread would free nothing
            hits = self.backend.search(*args)
        return {
            "hits": [
                {
                    "document_id": h.payload.get("document_id"),
                    "chunk_index": h.payload.get("chunk_index"),
                    "text": h.payload.get("text"),
                    "score": h.score,
                    "metadata": h.payload.get("metadata") or {},
                    "subject_id": h.payload.get("subject_id"),
                    "start": h.payload.get("start"),
                    "end": h.payload.get("end"),
                }
                for h in hits
            ],
            "query_tokens": tokens,
        }

    async def delete(self, document_ids: list[str] | None, subject_id: str | None) -> int:
        """Remove documents, or everything about one subject; returns the points removed."""
        self.telemetry.deletes.inc()
        async with self._writes:
            try:
                if subject_id is not None:
                    removed = await asyncio.to_thread(self.backend.delete_subject, subject_id)
                else:
                    removed = await asyncio.to_thread(
                        self.backend.delete_documents, document_ids or []
                    )
            finally:
                self._wrote()
            if subject_id is not None:
                now = time.monotonic()
                self._erased = {
                    s: mark for s, mark in self._erased.items() if now - mark[1] < ERASED_FOR_S
                }
                self._erased[subject_id] = (self.write_version, now)
        return removed

    def _wrote(self) -> None:
        """After every write, before it returns: no cached search answers any more."""
        self.write_version += 1
        if self.cache is not None:
            self.cache.clear()
        self._last_write = time.monotonic()

    def _query_ids(self, query: str) -> list[int]:
        ids = self.tokenizer(query, truncation=True, max_length=self.token_limit)
        return list(ids["input_ids"])

    async def chunk(self, text: str) -> dict[str, Any]:
        """What an upsert would store for `text` (cleaned, chunked), without storing it."""
        return await asyncio.to_thread(self._chunk, text)

    def _chunk(self, text: str) -> dict[str, Any]:
        cleaned = clean_text(text, self.spec.cleaning)
        chunks = self._split([cleaned])[0] if cleaned.strip() else []
        return {
            "text": cleaned,
            "chunks": [
                {
                    "chunk_index": c.index,
                    "text": c.text,
                    "start": c.start,
                    "end": c.end,
                    "tokens": len(c.ids),
                }
                for c in chunks
            ],
        }

    async def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_name,
            "collection": self.collection,
            "store": self.spec.store.type,
            "dimension": self.dimension,
            "points": await asyncio.to_thread(self.backend.count),
            "max_tokens": self.chunker.max_tokens,
            "error": str(self.mismatch) if self.mismatch else None,
        }

    # ---- background ----------------------------------------------------------------
    def _schedule_optimize(self) -> None:
        if self._optimizer is None or self._optimizer.done():
            self._optimizer = asyncio.get_running_loop().create_task(self._optimize_when_idle())

    async def _optimize_when_idle(self) -> None:
        """Build the HNSW graph once writes pause; searches keep running meanwhile."""
        while True:
            idle = time.monotonic() - self._last_write
            if idle >= OPTIMIZE_AFTER_S:
                break
            await asyncio.sleep(OPTIMIZE_AFTER_S - idle)
        async with self._writes:
            try:
                await asyncio.to_thread(self.backend.optimize)
            except Exception as exc:  # an unoptimized index still answers, exactly
                log.warning("index %s: optimize failed: %s", self.name, exc)

    def __del__(self) -> None:
        telemetry = getattr(self, "telemetry", None)
        if telemetry is not None:
            telemetry.pusher.stop()
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
        lock = getattr(self, "_lock_file", None)
        if lock is not None:
            lock.close()


async def _sliced(embedder: Any, rows: list[list[int]]) -> list[Any]:
    """Vectors for `rows` in slices, at most EMBED_IN_FLIGHT calls at a time, in order.

    The first failed slice cancels the others (queued or in flight): the request fails
    anyway, and the model should not keep embedding for nobody.
    """
    gate = asyncio.Semaphore(EMBED_IN_FLIGHT)

    async def one(start: int) -> Any:
        async with gate:
            return await embedder.embed_tokens.remote(rows[start : start + EMBED_SLICE])

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i)) for i in range(0, len(rows), EMBED_SLICE)]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _take_shard_lock(home: Path, collection: str) -> IO[str]:
    """Own the embedded shard: an exclusive flock, waiting for a replica being replaced."""
    path = index_shard_lock(home, collection)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")  # noqa: SIM115 (held for the life)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise RuntimeError(
                    f"index shard {collection} is held by another process for {LOCK_WAIT_S}s"
                ) from None
            time.sleep(0.2)


IndexDeployment: Any = serve.deployment(name="IndexServer")(IndexServer)


def build_index_app(args: dict[str, Any]) -> Any:
    """Serve application builder (the `import_path` of every index app)."""
    return IndexDeployment.bind(
        args["name"],
        args["spec"],
        args["model"],
        args["home"],
        args.get("qdrant_url"),
        args.get("sources"),
        args.get("cache"),
    )
