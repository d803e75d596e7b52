"""Feedback: the store (replace, filters, erasure, tallies) and `/v1/models/feedback` in an
in-process gateway, rating requests by their audit rows and tasks by their task rows.

No model answers here (no Ray): a request a model answered is its audit row, recorded
into the gateway's own trail as the guard records it. The whole path with a real
inference request is `tests/stack/test_feedback_stack.py`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from gateways import audit_rows, close_all, gateway, new_key, seed_support_and_other
from support import AUTH

from dify_serving.feedback import FeedbackStore, score, split_model
from dify_serving.gateway.app import create_app
from dify_serving.gateway.dataplane import feedback as plane
from dify_serving.gateway.policy import rule_for
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions
from dify_serving.security.audit import AuditEntry
from dify_serving.security.secrets import Secrets
from dify_serving.tasks.store import TaskStore

ADMIN_ID = AUTH["Authorization"].split()[1].split("_")[1]


# ---- the store ----------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    opened = FeedbackStore.open(tmp_path, None)
    yield opened
    opened.close()


def rate(store: FeedbackStore, ref: str, rating: str, **over: Any) -> tuple[Any, bool]:
    args: dict[str, Any] = {
        "kind": "request",
        "ref": ref,
        "key_id": "k1",
        "model": "m",
        "version": None,
        "rating": rating,
    }
    return store.rate(**(args | over))


def test_scores_and_served_names() -> None:
    assert [score(r) for r in ("1", "2", "3", "4", "5", "up", "down")] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        0.0,
    ]
    assert split_model("demo-llm") == ("demo-llm", None)
    assert split_model("demo-llm@v2") == ("demo-llm", "v2")


def test_a_second_rating_by_the_same_key_replaces_the_first(store: FeedbackStore) -> None:
    first, replaced = rate(store, "r1", "up", comment="good")
    assert not replaced and first.rating == "up"
    second, replaced = rate(store, "r1", "2", comment=None)
    assert replaced and second.seq == first.seq and second.rating == "2"
    assert second.comment is None and second.rated_at >= first.rated_at
    other, replaced = rate(store, "r1", "down", key_id="k2")  # another key: its own row
    assert not replaced and other.seq != first.seq
    task, replaced = rate(store, "r1", "5", kind="task")  # a task of the same id: another row
    assert not replaced and task.seq not in (first.seq, other.seq)
    assert len(store.page()) == 3
    # the tally counts every rating received; the gauge only the ones kept
    counts = {(t.model, t.rating): t.count for t in store.tallies()}
    assert counts == {("m", "up"): 1, ("m", "2"): 1, ("m", "down"): 1, ("m", "5"): 1}
    (kept,) = store.satisfaction()
    assert kept.ratings == 3 and kept.ratio == pytest.approx((0.25 + 0.0 + 1.0) / 3)


def test_a_rating_outside_the_scale_is_refused(store: FeedbackStore) -> None:
    for bad in ("0", "6", "meh", ""):
        with pytest.raises(ValueError, match="rating must be one of"):
            rate(store, "r1", bad)
    assert store.page() == []


def test_filters_paging_and_erasure(store: FeedbackStore) -> None:
    now = [1000.0]
    store.clock = lambda: now[0]
    for i in range(6):
        now[0] = 1000.0 + i
        rate(
            store,
            f"r{i}",
            "up" if i % 2 else "1",
            model="a" if i < 4 else "b",
            version="v2" if i == 3 else None,
            subject_id="alice" if i in (1, 4) else None,
        )
    refs = lambda rows: [r.ref for r in rows]  # noqa: E731
    assert refs(store.page()) == ["r5", "r4", "r3", "r2", "r1", "r0"]
    assert refs(store.page(model="a")) == ["r3", "r2", "r1", "r0"]
    assert refs(store.page(model="a", version="v2")) == ["r3"]
    assert refs(store.page(rating="up")) == ["r5", "r3", "r1"]
    assert refs(store.page(since=1002.0, until=1004.0)) == ["r3", "r2"]
    first = store.page(limit=2)
    assert refs(first) == ["r5", "r4"]
    assert refs(store.page(before=first[-1].seq, limit=2)) == ["r3", "r2"]
    assert {(s.model, s.version) for s in store.satisfaction()} == {
        ("a", None),
        ("a", "v2"),
        ("b", None),
    }
    assert store.erase_subject("alice") == 2
    assert refs(store.page()) == ["r5", "r3", "r2", "r0"]
    assert store.erase_subject("alice") == 0
    assert sum(t.count for t in store.tallies()) == 6  # tallies name nobody: they stay


# ---- the gateway --------------------------------------------------------------------------
@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(plane, "METRICS_CACHE_S", 0.0)
    yield seed_support_and_other(tmp_path)
    close_all()


@pytest.fixture
def client(home: Path) -> TestClient:
    return gateway(home)


def served(
    client: TestClient,
    key_id: str,
    model: str | None = "other-llm",
    status: int = 200,
    route: str = "/v1/inference",
    flush: bool = True,
) -> str:
    """The id of a request `key_id` made, as the guard records it (the audit row)."""
    rid = uuid.uuid4().hex
    guard = client.app.state.guard  # type: ignore[attr-defined]
    guard.audit.record(
        AuditEntry(
            time=time.time(),
            request_id=rid,
            key_id=key_id,
            client_ip="127.0.0.1",
            method="POST",
            route=route,
            status=status,
            latency_ms=3.0,
            model=model,
        )
    )
    if flush:
        guard.audit.flush()
    return rid


def post(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    return client.post("/v1/models/feedback", json=body, headers=headers)


def listing(client: TestClient, headers: dict[str, str] = AUTH, **query: Any) -> Any:
    r = client.get("/v1/models/feedback", params=query, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_rating_a_request_then_rating_it_again_replaces_the_rating(client: TestClient) -> None:
    rid = served(client, ADMIN_ID)
    r = post(client, AUTH, request_id=rid, rating="up", comment="helpful", subject_id="alice")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["request_id"] == rid and body["replaced"] is False
    assert (body["model"], body["version"], body["rating"], body["score"]) == (
        "other-llm",
        None,
        "up",
        1.0,
    )
    r = post(client, AUTH, request_id=rid, rating=2, comment="on reflection, not much")
    assert r.status_code == 200 and r.json()["replaced"] is True
    assert r.json()["id"] == body["id"]
    rows = listing(client)["data"]
    assert [(x["request_id"], x["rating"], x["comment"]) for x in rows] == [
        (rid, 2, "on reflection, not much")
    ]
    # each call left its audit row, which says what was rated
    audited = audit_rows(client, route="/v1/models/feedback")
    assert [(a["method"], a["status"]) for a in audited] == [
        ("POST", 201),
        ("POST", 200),
        ("GET", 200),
    ]
    assert audited[1]["detail"] == f"feedback on request {rid}: 2 (replaced)"
    assert audited[1]["model"] is None  # a rating is no inference request: not rateable


def test_a_row_not_yet_written_is_found_by_flushing_the_trail(client: TestClient) -> None:
    rid = served(client, ADMIN_ID, flush=False)
    assert post(client, AUTH, request_id=rid, rating=5).status_code == 201


def test_the_version_that_served_is_stored_apart(client: TestClient) -> None:
    rid = served(client, ADMIN_ID, model="other-llm@v2")
    body = post(client, AUTH, request_id=rid, rating=4).json()
    assert (body["model"], body["version"], body["score"]) == ("other-llm", "v2", 0.75)
    assert [x["request_id"] for x in listing(client, model="other-llm", version="v2")["data"]] == [
        rid
    ]
    assert listing(client, model="other-llm", version="v1")["data"] == []


def test_unknown_other_keys_and_unanswered_requests_are_refused(client: TestClient) -> None:
    user = new_key(client, scopes=["inference"])
    other = new_key(client, scopes=["inference"])
    r = post(client, user["headers"], request_id="no-such-request", rating="up")
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    theirs = served(client, other["id"])
    r = post(client, user["headers"], request_id=theirs, rating="up")
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    listed = served(client, user["id"], model=None, route="/v1/models")
    r = post(client, user["headers"], request_id=listed, rating="up")
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_rateable"
    assert "/v1/models" in r.json()["error"]["message"]
    failed = served(client, user["id"], status=503)
    r = post(client, user["headers"], request_id=failed, rating="down")
    assert r.status_code == 422 and "status 503" in r.json()["error"]["message"]
    mine = served(client, user["id"])
    assert post(client, user["headers"], request_id=mine, rating="down").status_code == 201
    assert post(client, other["headers"], request_id=mine, rating="up").status_code == 404
    assert listing(client, rating="down")["data"][0]["key_id"] == user["id"]


BAD_INPUT = [
    ({"rating": 6}, "rating"),
    ({"rating": 0}, "rating"),
    ({"rating": "meh"}, "rating"),
    ({"rating": True}, "rating"),
    ({"rating": 2.5}, "rating"),
    ({"rating": "up", "comment": "x" * 2001}, "comment"),
    ({"rating": "up", "subject_id": "s" * 513}, "subject_id"),
    ({"rating": "up", "request_id": "r" * 129}, "request_id"),
    ({"rating": "up", "task_id": "task-1"}, "exactly one"),
    ({"rating": "up", "request_id": None}, "exactly one"),
    ({"rating": "up", "extra": 1}, "extra"),
]


def test_bad_input_is_422_naming_the_field(client: TestClient) -> None:
    for bad, field in BAD_INPUT:
        r = post(client, AUTH, **({"request_id": "r-1"} | bad))
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
        assert field in r.json()["error"]["message"], (bad, r.text)


def finished_task(home: Path, owner: str, model: str | None, output: Any, done: bool = True) -> str:
    store = TaskStore.open(home, None, 3600)
    task = store.create(owner=owner, kind="inference", queue="q", request={}, model=model)
    if done:
        assert store.claim(task.id, "runner", 60, 3) is not None
        assert store.finish(task.id, "runner", output=output)
    store.close()
    return task.id


def test_rating_tasks(client: TestClient, home: Path) -> None:
    user = new_key(client, scopes=["inference"])
    answered = finished_task(home, user["id"], "other-llm", {"model": "other-llm@v3", "text": "x"})
    r = post(client, user["headers"], task_id=answered, rating=1)
    assert r.status_code == 201, r.text
    assert (r.json()["task_id"], r.json()["version"], r.json()["score"]) == (answered, "v3", 0.0)
    running = finished_task(home, user["id"], "other-llm", None, done=False)
    r = post(client, user["headers"], task_id=running, rating=1)
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_not_completed"
    bulk = finished_task(home, user["id"], None, {"documents": 3})
    r = post(client, user["headers"], task_id=bulk, rating=1)
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_rateable"
    theirs = finished_task(home, "someone-else", "other-llm", "text")
    r = post(client, user["headers"], task_id=theirs, rating=1)
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
    assert post(client, AUTH, task_id=theirs, rating=1).status_code == 404  # admin too
    r = post(client, user["headers"], task_id="task-doesnotexist", rating=1)
    assert r.status_code == 404


def test_reading_feedback_needs_models_admin_and_filters(client: TestClient) -> None:
    user = new_key(client, scopes=["inference"])
    r = client.get("/v1/models/feedback", headers=user["headers"])
    assert r.status_code == 403 and "models:admin" in r.json()["error"]["message"]
    ids = [served(client, ADMIN_ID, model=m) for m in ("other-llm", "support-llm", "other-llm")]
    for rid, rating in zip(ids, ("up", 3, "down"), strict=True):
        assert post(client, AUTH, request_id=rid, rating=rating).status_code == 201
    assert [x["request_id"] for x in listing(client)["data"]] == ids[::-1]
    assert [x["request_id"] for x in listing(client, model="other-llm")["data"]] == [
        ids[2],
        ids[0],
    ]
    assert [x["rating"] for x in listing(client, rating="3")["data"]] == [3]
    assert listing(client, since=time.time() + 60)["data"] == []
    assert len(listing(client, until="2999-01-01T00:00:00")["data"]) == 3
    page = listing(client, limit=2)
    assert len(page["data"]) == 2 and page["next_cursor"]
    rest = listing(client, limit=2, cursor=page["next_cursor"])
    assert [x["request_id"] for x in rest["data"]] == [ids[0]] and rest["next_cursor"] is None
    for bad in ({"rating": "7"}, {"since": "yesterday"}, {"cursor": "abc"}, {"model": "../x"}):
        r = client.get("/v1/models/feedback", params=bad, headers=AUTH)
        assert r.status_code == 422, (bad, r.text)
    confined = new_key(client, scopes=["models:admin"], models=["support-*"])
    r = client.get("/v1/models/feedback", headers=confined["headers"])
    assert r.status_code == 422 and "name one of them" in r.json()["error"]["message"]
    r = client.get(
        "/v1/models/feedback", params={"model": "other-llm"}, headers=confined["headers"]
    )
    assert r.status_code == 403
    mine = listing(client, confined["headers"], model="support-llm")["data"]
    assert [x["request_id"] for x in mine] == [ids[1]]


def test_subject_erasure_removes_feedback(client: TestClient) -> None:
    kept, erased = served(client, ADMIN_ID), served(client, ADMIN_ID)
    post(client, AUTH, request_id=kept, rating="up", subject_id="bob")
    post(client, AUTH, request_id=erased, rating="down", subject_id="alice")
    r = client.post("/v1/data/delete", json={"subject_id": "alice"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["feedback_removed"] == 1
    assert [x["request_id"] for x in listing(client)["data"]] == [kept]


def scrape(client: TestClient) -> str:
    r = client.get("/v1/metrics", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.text


def test_feedback_metrics_per_model_and_version(client: TestClient, home: Path) -> None:
    assert "dify_feedback_total{" not in scrape(client)  # nothing rated: no file opened
    assert not (home / "feedback.db").exists()
    for model, rating in (("other-llm", "up"), ("other-llm", 2), ("other-llm", "up")):
        post(client, AUTH, request_id=served(client, ADMIN_ID, model=model), rating=rating)
    post(client, AUTH, request_id=served(client, ADMIN_ID, model="gone-llm"), rating="down")
    post(client, AUTH, request_id=served(client, ADMIN_ID, model="other-llm@v9"), rating=1)
    text = scrape(client)
    assert 'dify_feedback_total{model="other-llm",rating="up",version=""} 2.0' in text
    assert 'dify_feedback_total{model="other-llm",rating="2",version=""} 1.0' in text
    assert 'dify_feedback_created{model="other-llm",rating="up",version=""}' in text
    ratio = 'dify_feedback_satisfaction_ratio{model="other-llm",version=""} '
    assert float(text.split(ratio)[1].split()[0]) == pytest.approx((1 + 0.25 + 1) / 3)
    assert "gone-llm" not in text  # only models the catalog knows
    assert 'version="v9"' not in text  # nor versions it does not list
    openmetrics = client.get(
        "/v1/metrics", headers=AUTH | {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert "# TYPE dify_feedback counter" in openmetrics.text


def test_the_route_is_mounted_before_the_models_routes(client: TestClient) -> None:
    assert rule_for("POST", "/v1/models/feedback").scopes == ("inference",)
    assert rule_for("GET", "/v1/models/feedback").scopes == ("models:admin",)
    paths = [c.path for c in iter_route_contexts(list(client.app.routes)) if c.methods == {"GET"}]
    assert paths.index("/v1/models/feedback") < paths.index("/v1/models/{name}/ready")


def test_without_security_only_tasks_can_be_rated(home: Path) -> None:
    options = GatewayOptions(home=str(home), security=SecurityOptions(enabled=False))
    client = TestClient(create_app(GatewayState(options), Secrets(home)))
    r = post(client, {}, request_id="r-1", rating="up")
    assert r.status_code == 404 and "security is off" in r.json()["error"]["message"]
    task = finished_task(home, "-", "other-llm", "text")
    r = post(client, {}, task_id=task, rating="up")
    assert r.status_code == 201, r.text
    assert r.json()["key_id"] == "-"
