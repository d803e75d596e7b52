"""Feedback rows and the audit lookup on PostgreSQL (127.0.0.1:5432), in a database of
their own: the same cases as on SQLite (`tests/unit/test_feedback.py`), plus ratings of
one request racing each other."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from support import require_service

from dify_serving.feedback import FeedbackStore, ServedRequests
from dify_serving.security.audit.schema import LOG, METADATA

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture
def database() -> Iterator[str]:
    admin = sa.create_engine(f"{SERVER}/postgres", isolation_level="AUTOCOMMIT")
    require_service("PostgreSQL", lambda: admin.connect().close())
    name = f"dm_feedback_{uuid.uuid4().hex[:10]}"
    with admin.connect() as db:
        db.execute(sa.text(f"CREATE DATABASE {name}"))
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as db:
        db.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def test_ratings_replace_filter_and_erase_on_postgresql(database: str) -> None:
    store = FeedbackStore(database)
    args = {"kind": "request", "key_id": "k1", "model": "m", "version": None}
    first, replaced = store.rate(ref="r1", rating="up", subject_id="alice", **args)  # type: ignore[arg-type]
    assert not replaced
    second, replaced = store.rate(ref="r1", rating="3", subject_id="alice", **args)  # type: ignore[arg-type]
    assert replaced and second.seq == first.seq
    store.rate(ref="r2", rating="down", **args | {"version": "v2"})  # type: ignore[arg-type]
    assert [(f.ref, f.rating, f.version) for f in store.page()] == [
        ("r2", "down", "v2"),
        ("r1", "3", None),
    ]
    assert [f.ref for f in store.page(version="v2")] == ["r2"]
    assert {(s.version, s.ratio) for s in store.satisfaction()} == {(None, 0.5), ("v2", 0.0)}
    assert store.erase_subject("alice") == 1
    assert [f.ref for f in store.page()] == ["r2"]
    assert sum(t.count for t in store.tallies()) == 3
    store.close()


def test_ratings_of_one_request_racing_leave_one_row(database: str) -> None:
    store = FeedbackStore(database)
    ratings = ["up", "down", "1", "5"] * 4

    def rate(rating: str) -> bool:
        return store.rate(
            kind="request", ref="r", key_id="k", model="m", version=None, rating=rating
        )[1]

    with ThreadPoolExecutor(8) as pool:
        replaced = list(pool.map(rate, ratings))
    assert replaced.count(False) == 1  # one first rating, every other one replaced it
    assert len(store.page()) == 1
    assert sum(t.count for t in store.tallies()) == len(ratings)
    store.close()


def test_the_audit_row_of_a_request_is_found_on_postgresql(database: str) -> None:
    engine = sa.create_engine(database.replace("postgresql", "postgresql+psycopg"))
    METADATA.create_all(engine)
    now = time.time()
    rows = [
        ("a", "k1", "/v1/inference", 200, "demo-llm@v2"),
        ("a", "k2", "/v1/inference", 200, "other"),
        ("b", "k1", "/v1/models", 200, None),
    ]
    with engine.begin() as db:
        db.execute(
            LOG.insert(),
            [
                {
                    "seq": i + 1,
                    "time": now + i,
                    "request_id": rid,
                    "key_id": key,
                    "method": "POST",
                    "route": route,
                    "status": status,
                    "latency_ms": 1.0,
                    "model": model,
                    "prev_hash": "0" * 64,
                    "hash": "1" * 64,
                }
                for i, (rid, key, route, status, model) in enumerate(rows)
            ],
        )
    engine.dispose()
    served = ServedRequests(database)
    found = served.find("a", "k1", now - 60)
    assert found is not None and found.model == "demo-llm@v2" and found.rateable
    other = served.find("a", "k2", now - 60)
    assert other is not None and other.model == "other"
    listed = served.find("b", "k1", now - 60)
    assert listed is not None and not listed.rateable and listed.route == "/v1/models"
    assert served.find("a", "k3", now - 60) is None
    assert served.find("a", "k1", now + 60) is None  # older than the window
    served.close()
