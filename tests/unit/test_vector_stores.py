"""Congruence tests: the same behaviour from Qdrant Edge and from qdrant_client (local mode)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient

from dify_serving.knowledge.backends import VectorBackend, open_backend
from dify_serving.knowledge.backends.qdrant_edge import QdrantEdgeBackend
from dify_serving.knowledge.backends.qdrant_server import QdrantServerBackend
from dify_serving.knowledge.errors import (
    DimensionMismatch,
    InvalidFilter,
    StoreError,
    UnknownFilterField,
)
from dify_serving.knowledge.filters import Match, MatchAny, Range, StoreFilter, build_filter
from dify_serving.knowledge.journal import versioned_id
from dify_serving.knowledge.points import ChunkPoint, point_id
from dify_serving.specs import DifyIndexSpec

DIM = 16
INDEX = "kb"
LANGS = ("en", "de", "fr")


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def make_spec(**store: Any) -> DifyIndexSpec:
    return DifyIndexSpec.model_validate(
        {"embeddingModel": "m", "filterableFields": ["lang", "year", "draft"], "store": store}
    )


def chunks(
    doc: str,
    vectors: np.ndarray,
    version: str = "v1",
    subject: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> list[ChunkPoint]:
    return [
        ChunkPoint(
            point_id(INDEX, doc, i),
            row,
            {
                "document_id": doc,
                "chunk_index": i,
                "text": f"{doc} #{i}",
                "start": i * 10,
                "end": i * 10 + 9,
                "subject_id": subject,
                "metadata": metadata or {},
                "version": version,
            },
        )
        for i, row in enumerate(vectors)
    ]


Opener = Callable[[], VectorBackend]
BACKENDS = ["embedded", "qdrant-local"]


def opener_for(backend: str, root: Path) -> tuple[Opener, list[VectorBackend]]:
    """Opens (and reopens) one store over the data under `root`."""
    opened: list[VectorBackend] = []
    spec = make_spec()

    def open_() -> VectorBackend:
        if backend == "embedded":
            store = open_backend(INDEX, spec, root)
        else:
            qdrant = QdrantClient(path=str(root / "qdrant"))
            store = open_backend(INDEX, spec, root, client=qdrant)
        opened.append(store)
        return store

    return open_, opened


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    open_, opened = opener_for(request.param, tmp_path)
    yield open_
    for store in opened:
        store.close()


@pytest.fixture()
def store(opener: Opener) -> VectorBackend:
    s = opener()
    s.ensure(DIM)
    return s


def fill(store: VectorBackend) -> dict[str, Any]:
    """12 documents x 4 chunks with metadata, two subjects; returns vectors and payloads."""
    rng = np.random.default_rng(7)
    docs, vectors, payloads = [], [], []
    for d in range(12):
        meta = {"lang": LANGS[d % 3], "year": 2015 + d, "draft": d % 4 == 0}
        subject = ("alice", "bob", None)[d % 3]
        rows = unit(rng.normal(size=(4, DIM)))
        points = chunks(f"doc{d}", rows, subject=subject, metadata=meta)
        docs.append((f"doc{d}", points))
        vectors.extend(rows)
        payloads.extend(p.payload for p in points)
    store.upsert_many(docs)
    ids = [p.id for _, points in docs for p in points]
    return {"ids": ids, "vectors": np.stack(vectors), "payloads": payloads}


@pytest.fixture()
def corpus(store: VectorBackend) -> dict[str, Any]:
    return fill(store)


@pytest.fixture(scope="module", params=BACKENDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VectorBackend, dict[str, Any]]]:
    """One filled store per backend for the tests that only read."""
    open_, opened = opener_for(request.param, tmp_path_factory.mktemp(request.param))
    store = open_()
    store.ensure(DIM)
    yield store, fill(store)
    for s in opened:
        s.close()


# ---- lifecycle ------------------------------------------------------------------------
def test_ensure_is_idempotent_and_refuses_another_dimension(opener: Opener) -> None:
    store = opener()
    assert store.dimension is None and store.count() == 0
    store.ensure(DIM)
    store.ensure(DIM)
    assert store.dimension == DIM and store.count() == 0
    with pytest.raises(DimensionMismatch) as err:
        store.ensure(DIM * 2)
    assert (err.value.existing, err.value.requested) == (DIM, DIM * 2)
    assert str(DIM) in str(err.value) and str(DIM * 2) in str(err.value)
    assert store.count() == 0  # still usable for reads


def test_replace_document_drops_the_stale_tail(store: VectorBackend) -> None:
    rng = np.random.default_rng(1)
    assert store.replace_document("a", chunks("a", unit(rng.normal(size=(5, DIM))), "v1")) == 0
    assert store.count() == 5
    fewer = chunks("a", unit(rng.normal(size=(3, DIM))), "v2")
    assert store.replace_document("a", fewer) == 2
    assert store.count() == 3
    hits = store.search(fewer[0].vector, 10, {"document_id": "a"})
    assert sorted(h.payload["chunk_index"] for h in hits) == [0, 1, 2]
    assert {h.payload["version"] for h in hits} == {"v2"}
    assert store.replace_document("a", chunks("a", unit(rng.normal(size=(3, DIM))), "v3")) == 0
    assert store.replace_document("a", []) == 3
    assert store.count() == 0


def test_upsert_many_counts_per_document(store: VectorBackend) -> None:
    rng = np.random.default_rng(2)
    store.upsert_many([(d, chunks(d, unit(rng.normal(size=(4, DIM))))) for d in ("a", "b", "c")])
    removed = store.upsert_many(
        [
            ("a", chunks("a", unit(rng.normal(size=(1, DIM))), "v2")),
            ("b", chunks("b", unit(rng.normal(size=(4, DIM))), "v2")),
            ("d", chunks("d", unit(rng.normal(size=(2, DIM))), "v2")),
            ("a", chunks("a", unit(rng.normal(size=(2, DIM))), "v2")),  # the later one wins
        ]
    )
    assert removed == {"a": 2, "b": 0, "d": 0}
    assert store.count() == 2 + 4 + 4 + 2


def test_points_must_be_consistent(store: VectorBackend) -> None:
    rng = np.random.default_rng(3)
    points = chunks("a", unit(rng.normal(size=(2, DIM))))
    with pytest.raises(StoreError, match="does not belong"):
        store.replace_document("b", points)
    with pytest.raises(DimensionMismatch):
        store.replace_document("a", chunks("a", unit(rng.normal(size=(2, DIM + 1)))))
    mixed = [points[0], chunks("a", unit(rng.normal(size=(2, DIM))), "v9")[1]]
    with pytest.raises(StoreError, match="version"):
        store.replace_document("a", mixed)
    assert store.count() == 0


# ---- search ---------------------------------------------------------------------------
def test_search_finds_the_nearest(shared: tuple[VectorBackend, dict[str, Any]]) -> None:
    store, corpus = shared
    vectors, ids = corpus["vectors"], corpus["ids"]
    for k in (0, 17, 46):
        hits = store.search(vectors[k], 5)
        assert len(hits) == 5
        assert hits[0].id == ids[k] and hits[0].score == pytest.approx(1.0, abs=1e-3)
        truth = [ids[i] for i in np.argsort(-(vectors @ vectors[k]))[:5]]
        assert [h.id for h in hits] == truth
        assert [h.id for h in store.search(vectors[k], 5, exact=True)] == truth
        assert isinstance(hits[0].payload, dict) and hits[0].payload["metadata"]["year"] > 2000
    assert len(store.search(vectors[0], 100)) == len(ids)


def test_score_threshold(shared: tuple[VectorBackend, dict[str, Any]]) -> None:
    store, corpus = shared
    vectors = corpus["vectors"]
    sims = vectors @ vectors[3]
    hits = store.search(vectors[3], 48, score_threshold=0.3)
    assert len(hits) == int((sims >= 0.3).sum()) and all(h.score >= 0.3 for h in hits)
    assert [h.id for h in store.search(vectors[3], 5, score_threshold=0.999)] == [corpus["ids"][3]]


def test_search_batch(shared: tuple[VectorBackend, dict[str, Any]]) -> None:
    store, corpus = shared
    vectors, ids = corpus["vectors"], corpus["ids"]
    batches = store.search_batch(vectors[[1, 2, 30]], 3, {"lang": ["en", "de", "fr"]})
    assert [b[0].id for b in batches] == [ids[1], ids[2], ids[30]]
    assert all(len(b) == 3 for b in batches)


FILTER_CASES: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    ({"lang": "en"}, lambda p: p["metadata"]["lang"] == "en"),
    ({"lang": ["de", "fr"]}, lambda p: p["metadata"]["lang"] in ("de", "fr")),
    ({"year": {"gte": 2018, "lt": 2022}}, lambda p: 2018 <= p["metadata"]["year"] < 2022),
    ({"year": {"gt": 2024}}, lambda p: p["metadata"]["year"] > 2024),
    ({"year": {"lte": 2015.5}}, lambda p: p["metadata"]["year"] <= 2015),
    ({"year": 2016}, lambda p: p["metadata"]["year"] == 2016),
    ({"year": [2016, 2017]}, lambda p: p["metadata"]["year"] in (2016, 2017)),
    ({"draft": True}, lambda p: p["metadata"]["draft"]),
    ({"draft": False}, lambda p: not p["metadata"]["draft"]),
    ({"document_id": "doc3"}, lambda p: p["document_id"] == "doc3"),
    ({"document_id": ["doc3", "doc5"]}, lambda p: p["document_id"] in ("doc3", "doc5")),
    ({"subject_id": "alice"}, lambda p: p["subject_id"] == "alice"),
    (
        {"subject_id": "bob", "lang": "de", "year": {"lte": 2020}},
        lambda p: p["subject_id"] == "bob" and p["metadata"]["year"] <= 2020,
    ),
    ({"lang": "xx"}, lambda p: False),
]


def test_filters(shared: tuple[VectorBackend, dict[str, Any]]) -> None:
    store, corpus = shared
    query = corpus["vectors"][0]
    for flt, keep in FILTER_CASES:
        expected = {i for i, p in zip(corpus["ids"], corpus["payloads"], strict=True) if keep(p)}
        assert {h.id for h in store.search(query, 100, flt)} == expected, flt
        prepared = build_filter(flt, {"document_id", "subject_id", "lang", "year", "draft"})
        assert {h.id for h in store.search(query, 100, prepared)} == expected, flt
        assert sum(map(len, store.search_batch([query, query], 100, flt))) == 2 * len(expected)


MALFORMED: list[Any] = [
    {"lang": {"like": "e%"}},
    {"lang": [{"a": 1}]},
    {"lang": []},
    {"lang": ["en", 1]},
    {"lang": [True, False]},
    {"year": {"gte": "2020"}},
    {"year": {"gte": True}},
    {"year": {}},
    {"year": 2020.5},
    {"lang": None},
    ["lang", "en"],
]


def test_malformed_filters(shared: tuple[VectorBackend, dict[str, Any]]) -> None:
    store, _ = shared
    for flt in MALFORMED:
        with pytest.raises(InvalidFilter):
            store.search(np.ones(DIM, np.float32), 3, flt)
            pytest.fail(f"accepted {flt!r}")


def test_unknown_filter_field(shared: tuple[VectorBackend, dict[str, Any]]) -> None:
    store, _ = shared
    with pytest.raises(UnknownFilterField) as err:
        store.search(np.ones(DIM, np.float32), 3, {"colour": "red"})
    assert err.value.field == "colour"
    for name in ("colour", "document_id", "subject_id", "lang", "year", "draft"):
        assert name in str(err.value)


def test_build_filter_is_backend_neutral() -> None:
    allowed = {"document_id", "subject_id", "lang", "year"}
    assert build_filter(None, allowed) is None
    assert build_filter({}, allowed) is None
    assert build_filter({"document_id": "a", "lang": ["en"], "year": {"gte": 1}}, allowed) == (
        StoreFilter(
            must=(
                Match("document_id", "a"),
                MatchAny("metadata.lang", ("en",)),
                Range("metadata.year", gte=1.0),
            )
        )
    )


# ---- deletes --------------------------------------------------------------------------
def test_delete_documents_and_subject(store: VectorBackend, corpus: dict[str, Any]) -> None:
    assert store.count() == 48
    assert store.delete_documents(["doc0", "doc1", "missing"]) == 8
    assert store.delete_documents([]) == 0
    assert store.count() == 40
    assert store.search(corpus["vectors"][0], 100, {"document_id": ["doc0", "doc1"]}) == []
    # alice: doc0 (gone), doc3, doc6, doc9
    assert store.delete_subject("alice") == 12
    assert store.delete_subject("alice") == 0
    assert store.count() == 28
    assert store.search(corpus["vectors"][12], 100, {"subject_id": "alice"}) == []


# ---- persistence and lifecycle ----------------------------------------------------------
def test_close_and_reopen_keeps_everything(opener: Opener) -> None:
    store = opener()
    store.ensure(DIM)
    rng = np.random.default_rng(4)
    rows = unit(rng.normal(size=(20, DIM)))
    store.upsert_many([("a", chunks("a", rows[:12])), ("b", chunks("b", rows[12:]))])
    before = [(h.id, round(h.score, 4)) for h in store.search(rows[5], 6)]
    store.close()
    again = opener()
    assert again.dimension == DIM
    again.ensure(DIM)
    assert again.count() == 20
    assert [(h.id, round(h.score, 4)) for h in again.search(rows[5], 6)] == before
    with pytest.raises(DimensionMismatch):
        again.ensure(DIM + 4)


def test_optimize_keeps_answers(store: VectorBackend, corpus: dict[str, Any]) -> None:
    before = [h.id for h in store.search(corpus["vectors"][9], 8, {"lang": "en"})]
    store.optimize()
    assert not store.needs_optimize()
    assert store.count() == 48
    assert [h.id for h in store.search(corpus["vectors"][9], 8, {"lang": "en"})] == before


def test_drop_removes_the_collection(opener: Opener) -> None:
    store = opener()
    store.ensure(DIM)
    store.replace_document("a", chunks("a", unit(np.ones((2, DIM)))))
    store.drop()
    assert store.dimension is None and store.count() == 0
    if isinstance(store, QdrantEdgeBackend):
        assert not store.directory.exists()
    else:
        assert isinstance(store, QdrantServerBackend)
        assert not store.client.collection_exists(INDEX)
    store.ensure(DIM + 8)
    assert store.dimension == DIM + 8 and store.count() == 0


# ---- embedded only ----------------------------------------------------------------------
def test_open_backend_places_the_shard(tmp_path: Path) -> None:
    store = open_backend("idx", make_spec(collection="shared"), tmp_path)
    assert (
        isinstance(store, QdrantEdgeBackend) and store.directory == tmp_path / "indexes" / "shared"
    )
    store.ensure(DIM)
    assert store.shard_path == store.directory / "shard-000001"
    assert (store.directory / "CURRENT").read_text() == "shard-000001"
    with pytest.raises(StoreError, match="another process"):
        open_backend("idx", make_spec(collection="shared"), tmp_path)
    store.replace_document("a", chunks("a", unit(np.ones((2, DIM)))))
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.search(np.ones(DIM), 1)
    (store.directory / "shard-000002").mkdir()  # a copy an interrupted optimize left behind
    again = open_backend("idx", make_spec(collection="shared"), tmp_path)
    assert again.count() == 2
    assert sorted(p.name for p in store.directory.iterdir()) == ["CURRENT", "shard-000001"]
    again.close()
    server = open_backend("idx", make_spec(), tmp_path, client=QdrantClient(location=":memory:"))
    assert isinstance(server, QdrantServerBackend) and server.name == "idx"
    server.close()


def test_point_ids_are_stable() -> None:
    assert point_id("kb", "doc", 0) == point_id("kb", "doc", 0)
    assert len({point_id("kb", "doc", 0), point_id("kb", "doc", 1), point_id("kb2", "doc", 0)}) == 3


def test_hnsw_recall_after_optimize_in_a_child_process(tmp_path: Path) -> None:
    """2500 x 32 (312 KB, over a 100 KB threshold): the child builds HNSW, the copy is swapped
    in, searches keep running meanwhile, and recall@10 against brute force stays >= 0.9."""
    spec = make_spec()
    store = QdrantEdgeBackend(tmp_path / "shard", "big", spec, indexing_threshold_kb=100)
    store.ensure(32)
    rng = np.random.default_rng(11)
    vectors = unit(rng.normal(size=(2500, 32)))
    docs = []
    for d in range(250):
        rows = vectors[d * 10 : d * 10 + 10]
        meta = {"lang": LANGS[d % 3], "year": 2000 + d % 25}
        docs.append((f"d{d}", chunks(f"d{d}", rows, metadata=meta)))
    store.upsert_many(docs)
    # 2,500 points: a journaled write, whose points take ids of its own
    ids = np.array([versioned_id(p.id, p.payload["version"]) for _, pts in docs for p in pts])
    assert store.info().unindexed == 2500 and store.needs_optimize()

    errors: list[BaseException] = []
    served = [0]
    stop = threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            try:
                assert store.search(vectors[served[0] % 2500], 3)[0].id == ids[served[0] % 2500]
                served[0] += 1
                time.sleep(0.002)  # leave the CPUs to the optimizer child
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=searcher)
    thread.start()
    started = time.perf_counter()
    assert store.optimize()
    stop.set()
    thread.join()
    assert not errors, errors
    assert served[0] > 0
    assert time.perf_counter() - started < 15

    info = store.info()
    assert info.points == 2500 and info.indexed == 2500 and not store.needs_optimize()
    assert store.shard_path is not None and store.shard_path.name == "shard-000002"
    assert sorted(p.name for p in store.directory.iterdir()) == ["CURRENT", "shard-000002"]

    queries = unit(rng.normal(size=(50, 32)))
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = store.search_batch(queries, 10)
    recall = np.mean(
        [len(set(ids[t]) & {h.id for h in hits}) / 10 for t, hits in zip(truth, found, strict=True)]
    )
    assert recall >= 0.9, recall

    years = np.array([2000 + (i // 10) % 25 for i in range(2500)])
    for query in queries[:5]:
        hits = store.search(query, 10, {"year": {"gte": 2010, "lt": 2013}})
        allowed = set(ids[(years >= 2010) & (years < 2013)])
        assert len(hits) == 10 and {h.id for h in hits} <= allowed

    # a write after the swap lands in the new shard and survives a reopen
    store.replace_document("d0", chunks("d0", vectors[:3], "v2", metadata={"lang": "en"}))
    assert store.count() == 2493
    store.close()
    reopened = QdrantEdgeBackend(tmp_path / "shard", "big", spec, indexing_threshold_kb=100)
    assert reopened.count() == 2493 and reopened.dimension == 32
    assert reopened.search(vectors[1500], 1)[0].id == ids[1500]
    reopened.close()


# ---- congruence: both backends, the same random data, queries and deletes ----------------
# qdrant-client's congruence tests in small: what one backend answers, the other must too.
# The data and queries are drawn from a seeded generator, so a failure reproduces exactly.
TAGS = ("red", "green", "blue", "black")
SUBJECTS = ("alice", "bob", "carol")
CONGRUENT_FIELDS = ["lang", "year", "rating", "draft", "tags"]


def random_documents(
    rng: np.random.Generator, count: int, version: str = "v1"
) -> list[tuple[str, list[ChunkPoint]]]:
    """`count` documents of 1-6 chunks: raw (not unit) vectors, so Dot and Euclid differ
    from Cosine, and metadata with gaps (a missing field must match nothing, on both)."""
    docs = []
    for d in range(count):
        meta: dict[str, Any] = {"lang": LANGS[int(rng.integers(len(LANGS)))]}
        if rng.random() < 0.8:
            meta["year"] = int(rng.integers(2000, 2030))
        if rng.random() < 0.8:
            meta["rating"] = round(float(rng.uniform(0, 5)), 2)
        if rng.random() < 0.8:
            meta["draft"] = bool(rng.random() < 0.3)
        meta["tags"] = [t for t in TAGS if rng.random() < 0.4]
        subject = None if rng.random() < 0.25 else SUBJECTS[int(rng.integers(len(SUBJECTS)))]
        rows = rng.normal(size=(int(rng.integers(1, 7)), DIM)).astype(np.float32)
        docs.append((f"doc{d}", chunks(f"doc{d}", rows, version, subject, meta)))
    return docs


def random_condition(rng: np.random.Generator, field: str, docs: int) -> Any:
    """One condition on `field` in the filter language: match, match-any or range."""
    if field == "lang":
        picked = list(rng.choice(LANGS, size=int(rng.integers(1, 3)), replace=False))
        return picked[0] if rng.random() < 0.5 else [str(v) for v in picked]
    if field == "tags":
        picked = list(rng.choice(TAGS, size=int(rng.integers(1, 3)), replace=False))
        return str(picked[0]) if rng.random() < 0.5 else [str(v) for v in picked]
    if field == "draft":
        return bool(rng.random() < 0.5)
    if field == "document_id":
        ids = [f"doc{i}" for i in rng.choice(docs + 3, size=int(rng.integers(1, 6)))]
        return ids[0] if len(ids) == 1 else ids
    if field == "subject_id":
        return str(rng.choice([*SUBJECTS, "nobody"]))
    # bounds on the values' own grid, so that gt/gte and lt/lte differ on some points
    if field == "year":
        if rng.random() < 0.4:
            years = [int(y) for y in rng.integers(2000, 2030, size=int(rng.integers(1, 4)))]
            return years[0] if len(years) == 1 else years
        bounds: list[float | int] = sorted(int(y) for y in rng.integers(2000, 2030, size=2))
    else:
        bounds = sorted(round(float(v), 2) for v in rng.uniform(0, 5, size=2))
    ops = {"gt": bounds[0], "gte": bounds[0], "lt": bounds[1], "lte": bounds[1]}
    chosen = [op for op in ops if rng.random() < 0.5] or ["gte"]
    return {op: ops[op] for op in chosen}


def random_filter(rng: np.random.Generator, docs: int) -> dict[str, Any]:
    fields = [*CONGRUENT_FIELDS, "document_id", "subject_id"]
    picked = rng.choice(fields, size=int(rng.integers(1, 4)), replace=False)
    return {str(f): random_condition(rng, str(f), docs) for f in picked}


def assert_congruent(edge: list[Any], server: list[Any], context: Any) -> None:
    """Same hits in the same order with the same payloads; scores within float error.

    Two scores closer than that error may come out in either order (a near tie), and a
    near tie at the cut may put either point last; every other position must agree.
    """
    assert len(edge) == len(server), context
    if not edge:
        return
    a = np.array([h.score for h in edge])
    b = np.array([h.score for h in server])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=str(context))
    by_id = {h.id: h for h in edge}
    for i, (x, y) in enumerate(zip(edge, server, strict=True)):
        if x.id != y.id:
            tied = np.isclose(a, a[i], rtol=1e-4, atol=1e-4)
            assert tied.sum() > 1, (context, i, x.id, y.id)
            assert y.id in by_id or i >= len(edge) - tied.sum(), (context, i, y.id)
        if y.id in by_id:
            assert by_id[y.id].payload == y.payload, (context, y.id)


def assert_backends_agree(
    edge: VectorBackend, server: VectorBackend, rng: np.random.Generator, docs: int
) -> int:
    """Random searches, with and without filters, thresholds and batches; returns how many."""
    asked = 0
    for q in range(60):
        query = rng.normal(size=DIM).astype(np.float32)
        top_k = int(rng.integers(1, 40))
        flt = random_filter(rng, docs) if q % 3 else None
        exact = bool(q % 5 == 0)
        hits = edge.search(query, top_k, flt, exact=exact)
        assert_congruent(hits, server.search(query, top_k, flt, exact=exact), (q, flt))
        asked += 1
        if len(hits) >= 2:  # a threshold midway between two answers, not on one
            threshold = (hits[0].score + hits[len(hits) // 2].score) / 2
            context = (q, flt, threshold)
            assert_congruent(
                edge.search(query, top_k, flt, threshold),
                server.search(query, top_k, flt, threshold),
                context,
            )
            asked += 1
    queries = rng.normal(size=(5, DIM)).astype(np.float32)
    flt = random_filter(rng, docs)
    for e, s in zip(
        edge.search_batch(queries, 7, flt), server.search_batch(queries, 7, flt), strict=True
    ):
        assert_congruent(e, s, ("batch", flt))
    return asked + len(queries)


@pytest.mark.parametrize("distance", ["Cosine", "Dot", "Euclid"])
def test_backends_answer_alike(tmp_path: Path, distance: str) -> None:
    """Qdrant Edge and a Qdrant server (qdrant-client's local mode) hold the same random
    points: every search, replacement and delete gives the same answer on both."""
    rng = np.random.default_rng({"Cosine": 101, "Dot": 202, "Euclid": 303}[distance])
    spec = DifyIndexSpec.model_validate(
        {
            "embeddingModel": "m",
            "filterableFields": CONGRUENT_FIELDS,
            "store": {"distance": distance},
        }
    )
    edge = open_backend(INDEX, spec, tmp_path)
    server = open_backend(INDEX, spec, tmp_path, client=QdrantClient(location=":memory:"))
    assert isinstance(edge, QdrantEdgeBackend) and isinstance(server, QdrantServerBackend)
    assert isinstance(edge, VectorBackend) and isinstance(server, VectorBackend)
    try:
        docs = random_documents(rng, 40)
        for backend in (edge, server):
            backend.ensure(DIM)
            assert backend.upsert_many(docs) == dict.fromkeys([d for d, _ in docs], 0)
        assert edge.count() == server.count() == sum(len(p) for _, p in docs)
        assert assert_backends_agree(edge, server, rng, len(docs)) > 100

        # replacements: new versions of some documents, shorter or longer (the stale tail
        # goes by a filter on document and version), and one emptied
        fresh = random_documents(rng, 40, version="v2")
        picked = [fresh[i] for i in sorted(rng.choice(40, size=12, replace=False))]
        picked.append((picked[-1][0], []))
        assert edge.upsert_many(picked) == server.upsert_many(picked)

        # deletes by filter: documents (some missing) and whole subjects
        ids = [f"doc{i}" for i in rng.choice(45, size=8, replace=False)]
        assert edge.delete_documents(ids) == server.delete_documents(ids)
        assert edge.delete_subject("bob") == server.delete_subject("bob") > 0
        assert edge.delete_subject("nobody") == server.delete_subject("nobody") == 0
        assert edge.count() == server.count()
        assert_backends_agree(edge, server, rng, len(docs))

        edge.optimize()  # merged segments answer as the appendable ones did
        assert_backends_agree(edge, server, rng, len(docs))
    finally:
        edge.close()
        server.close()


# ---- writes that take several engine calls ------------------------------------------------
class Cut(Exception):
    """A replica killed at this point of a write."""


def versions_of(store: VectorBackend, doc: str) -> dict[str, list[int]]:
    """Each stored version of `doc` (up to 2,000 points) → its chunk positions."""
    out: dict[str, list[int]] = {}
    for hit in store.search(np.ones(DIM), 2000, {"document_id": doc}, exact=True):
        out.setdefault(hit.payload["version"], []).append(hit.payload["chunk_index"])
    return {v: sorted(positions) for v, positions in out.items()}


@pytest.mark.parametrize("cut_at", ["put 2", "put 3", "delete"])
def test_a_write_cut_between_engine_calls_leaves_each_document_whole(
    opener: Opener, monkeypatch: pytest.MonkeyPatch, cut_at: str
) -> None:
    """Three engine calls of 4 points (a0-a3 | a4 a5 b0 b1 | b2-b4), cut before the second
    or the third, or after all of them but before the old versions go. The next opening
    finishes or undoes each document: never a mix of two texts."""
    from dify_serving.knowledge.backends import base

    monkeypatch.setattr(base, "UPSERT_BATCH", 4)
    rng = np.random.default_rng(7)
    store = opener()
    store.ensure(DIM)
    store.upsert_many([("a", chunks("a", unit(rng.normal(size=(3, DIM))), "old"))])
    assert store.count() == 3  # one call: in place, no journal
    calls = {"put": 0}
    engine = type(store)

    def put(self: Any, batch: Any) -> None:
        calls["put"] += 1
        if cut_at == f"put {calls['put']}":
            raise Cut
        engine._upsert(self, batch)

    def delete(self: Any, flt: Any) -> None:
        raise Cut

    monkeypatch.setattr(store, "_upsert", put.__get__(store))
    if cut_at == "delete":
        monkeypatch.setattr(store, "_delete", delete.__get__(store))
    new = [
        ("a", chunks("a", unit(rng.normal(size=(6, DIM))), "new")),
        ("b", chunks("b", unit(rng.normal(size=(5, DIM))), "new")),
    ]
    with pytest.raises(Cut):
        store.upsert_many(new)
    assert store.journal.path is not None and store.journal.path.exists()
    store.close()
    again = opener()
    old_a, new_a, new_b = {"old": [0, 1, 2]}, {"new": list(range(6))}, {"new": list(range(5))}
    expected = {  # a has all 6 new points once the second call is in, b once the third is
        "put 2": (old_a, {}),
        "put 3": (new_a, {}),
        "delete": (new_a, new_b),
    }[cut_at]
    assert (versions_of(again, "a"), versions_of(again, "b")) == expected
    assert again.journal.path is not None and not again.journal.path.exists()
    # and the journaled path writes whole when nothing cuts it
    assert again.upsert_many(new) == {"a": 3 if cut_at == "put 2" else 0, "b": 0}
    assert versions_of(again, "a") == {"new": [0, 1, 2, 3, 4, 5]}
    assert again.count() == 11


WRITER = """
import sys, numpy as np
from pathlib import Path
from dify_serving.knowledge.backends import open_backend
from tests.unit.test_vector_stores import DIM, INDEX, chunks, make_spec, unit
store = open_backend(INDEX, make_spec(), Path(sys.argv[1]))
store.ensure(DIM)
rng = np.random.default_rng(0)
docs = [f"d{i}" for i in range(8)]
store.upsert_many([(d, chunks(d, unit(rng.normal(size=(700, DIM))), "old")) for d in docs])
print("ready", flush=True)
while True:  # rewrite them over and over, 5,600 points (six engine calls) each time
    v = str(rng.integers(1 << 30))
    store.upsert_many([(d, chunks(d, unit(rng.normal(size=(700, DIM))), v)) for d in docs])
"""


def test_a_writer_killed_mid_write_leaves_every_document_whole(tmp_path: Path) -> None:
    """A real kill (SIGKILL) of a process rewriting 8 documents of 700 chunks each, at
    random points of its multi-call writes: on reopening, every document holds exactly one
    version with all 700 chunks."""
    import os
    import signal
    import subprocess
    import sys

    rng = np.random.default_rng(11)
    for attempt in range(3):
        home = tmp_path / f"h{attempt}"
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(home)],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parents[2],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
            time.sleep(float(rng.uniform(0.2, 1.5)))
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=30)
        store = open_backend(INDEX, make_spec(), home)
        try:
            for d in (f"d{i}" for i in range(8)):
                held = {v: len(p) for v, p in versions_of(store, d).items()}
                assert len(held) == 1 and set(held.values()) == {700}, (d, held)
                assert next(iter(versions_of(store, d).values())) == list(range(700))
            assert store.count() == 8 * 700
        finally:
            store.close()


# ---- a shard rewritten for a long time --------------------------------------------------
def _disk_mib(folder: Path) -> float:
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file()) / 2**20


def test_a_shard_rewritten_over_and_over_stays_the_same_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """768 points of MiniLM's size rewritten 12,000 times (a soak's upserts): the
    write-ahead log is flushed while the writes go on, so the last 9,000 writes add 21
    MiB (the log's files) where they added 57 MiB without the flushes."""
    from dify_serving.knowledge.backends import qdrant_edge

    monkeypatch.setattr(qdrant_edge, "FLUSH_INTERVAL_S", 0.05)  # the test's 3 s, not 30 min
    store = QdrantEdgeBackend(tmp_path / "shard", INDEX, make_spec())
    store.ensure(384)  # MiniLM's vectors: what a write costs the log
    rng = np.random.default_rng(5)
    rows = unit(rng.normal(size=(3, 384)))
    for n in range(12_000):
        if n == 3_000:
            settled = _disk_mib(tmp_path)
        doc = f"d{n % 256}"
        store.replace_document(doc, chunks(doc, rows, version=f"v{n}"))
    assert store.count() == 768
    grown = _disk_mib(tmp_path) - settled
    assert grown < 40, f"{grown:.0f} MiB more after 9,000 more writes"
    store.close()


def test_an_index_on_every_upserts_version_is_dropped_from_older_collections(
    tmp_path: Path,
) -> None:
    import qdrant_edge as qe

    store = QdrantEdgeBackend(tmp_path / "shard", INDEX, make_spec())
    store.ensure(DIM)
    store._shard_now().update(
        qe.UpdateOperation.create_field_index("version", qe.PayloadSchemaType.Keyword)
    )  # as releases before this one made it
    assert "version" in store._shard_now().info().payload_schema
    store.close()
    again = QdrantEdgeBackend(tmp_path / "shard", INDEX, make_spec())
    again.ensure(DIM)
    schema = again._shard_now().info().payload_schema
    assert "version" not in schema and "document_id" in schema
    again.close()
