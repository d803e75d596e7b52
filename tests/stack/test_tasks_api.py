"""Async tasks through the real stack: the gateway, the embedded broker, a Ray Serve task
consumer and the models, over real HTTP.

The brokers and stores one by one (Redis, RabbitMQ, PostgreSQL) and a consumer killed
mid-task are `tests/services/test_task_backends.py`; a stack stopped and started again
with tasks in flight is `test_task_restart.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import AUTH, index_doc, wait_for

from dify_serving.manifests import DesiredState, parse_documents

FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def inference_key(client: httpx.Client) -> str:
    r = client.post("/v1/admin/keys", json={"name": "tasks", "scopes": ["inference"]})
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/inference/async", json=body)
    assert r.status_code == 202, r.text
    task: dict[str, Any] = r.json()
    assert r.headers["location"] == f"/v1/tasks/{task['task_id']}"
    assert task["status"] == "PENDING" and "queue_position" in task
    return task


def wait_done(client: httpx.Client, task_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        task: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
        if task["status"] in FINISHED:
            return task
        assert time.monotonic() < deadline, task
        time.sleep(0.1)


def test_an_async_generation_answers_as_the_sync_route_does(client: httpx.Client) -> None:
    body = {"model": "demo-llm", "prompt": "The tide", "max_tokens": 24, "temperature": 0}
    sync = client.post("/v1/inference", json=body, headers={"Cache-Control": "no-cache"})
    assert sync.status_code == 200, sync.text
    task = wait_done(client, submit(client, **body)["task_id"])
    assert task["status"] == "COMPLETED", task
    assert task["output"] == sync.json()["output"]
    assert task["usage"]["completion_tokens"] == sync.json()["usage"]["completion_tokens"]
    assert task["attempts"] == 1
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    assert task["expires_at"] > task["finished_at"]


def test_model_may_be_left_out_and_any_task_runs(client: httpx.Client) -> None:
    generated = wait_done(client, submit(client, prompt="Hello", max_tokens=4)["task_id"])
    assert generated["status"] == "COMPLETED" and generated["model"] == "demo-llm"
    embedded = wait_done(
        client, submit(client, model="minilm", input=["a cat", "a dog"])["task_id"]
    )
    assert embedded["status"] == "COMPLETED"
    assert len(embedded["output"]) == 2 and len(embedded["output"][0]) == 384
    labelled = wait_done(client, submit(client, model="sentiment", input="great")["task_id"])
    assert labelled["status"] == "COMPLETED" and labelled["output"]


def test_a_streamed_task_can_be_followed_as_events(client: httpx.Client) -> None:
    task = submit(
        client, model="demo-llm", prompt="Once", max_tokens=48, temperature=0, stream=True
    )
    statuses, text, last = [], "", None
    with client.stream("GET", f"/v1/tasks/{task['task_id']}/events") as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        for line in events.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "delta" in event:
                text += event["delta"]
            elif event.get("object") == "task":
                last = event
            else:
                statuses.append(event["status"])
    assert last is not None and last["status"] == "COMPLETED"
    assert statuses[-1] == "COMPLETED" and statuses[0] in ("PENDING", "RUNNING")
    assert text == last["output"] and last["usage"]["completion_tokens"] > 0


def test_an_async_batch_is_one_task_answering_as_the_sync_batch(client: httpx.Client) -> None:
    body = {
        "model": "demo-llm",
        "requests": [
            {"prompt": "alpha", "max_tokens": 6, "temperature": 0},
            {"prompt": "beta", "max_tokens": 100_000},
            {"prompt": "gamma", "max_tokens": 6, "temperature": 0},
        ],
    }
    sync = client.post("/v1/inference/batch", json=body, headers={"Cache-Control": "no-cache"})
    assert sync.status_code == 200, sync.text
    r = client.post("/v1/inference/batch", json={**body, "async": True})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/tasks/{r.json()['task_id']}"
    task = wait_done(client, r.json()["task_id"])
    assert task["status"] == "COMPLETED" and task["kind"] == "batch"
    assert [item["status"] for item in task["output"]] == ["ok", "error", "ok"]
    assert [item.get("output") for item in task["output"]] == [
        item.get("output") for item in sync.json()["results"]
    ]
    assert task["usage"] == sync.json()["usage"]


def test_a_task_failing_in_the_model_says_why(client: httpx.Client) -> None:
    task = wait_done(client, submit(client, model="broken", prompt="x")["task_id"])
    assert task["status"] == "FAILED"
    assert task["error"]["code"] and "Traceback" not in task["error"]["message"]


def test_tasks_belong_to_their_key(client: httpx.Client, base_url: str) -> None:
    key = inference_key(client)
    with httpx.Client(base_url=base_url, headers=bearer(key), timeout=60) as other:
        mine = submit(other, prompt="mine", max_tokens=2)
        theirs = submit(client, prompt="theirs", max_tokens=2)
        for path in (f"/v1/tasks/{theirs['task_id']}", f"/v1/tasks/{theirs['task_id']}/events"):
            r = other.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
        assert other.delete(f"/v1/tasks/{theirs['task_id']}").status_code == 404
        listed = [t["task_id"] for t in other.get("/v1/tasks").json()["data"]]
        assert listed == [mine["task_id"]]
        wait_done(other, mine["task_id"])
    # admin sees everyone's
    assert client.get(f"/v1/tasks/{mine['task_id']}").status_code == 200
    everyone = [t["task_id"] for t in client.get("/v1/tasks", params={"limit": 200}).json()["data"]]
    assert mine["task_id"] in everyone and theirs["task_id"] in everyone


def test_listing_filters_by_status_and_pages(client: httpx.Client, base_url: str) -> None:
    key = inference_key(client)
    with httpx.Client(base_url=base_url, headers=bearer(key), timeout=60) as own:
        ids = [submit(own, prompt=f"p{i}", max_tokens=2)["task_id"] for i in range(5)]
        for task_id in ids:
            wait_done(own, task_id)
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 2, "status": "COMPLETED"}
            if cursor:
                params["cursor"] = cursor
            page = own.get("/v1/tasks", params=params).json()
            seen += [t["task_id"] for t in page["data"]]
            assert all(t["status"] == "COMPLETED" for t in page["data"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]
        assert own.get("/v1/tasks", params={"status": "RUNNING"}).json()["data"] == []
        assert own.get("/v1/tasks", params={"status": "DONE"}).status_code == 422
        assert own.get("/v1/tasks", params={"cursor": "x1"}).status_code == 422


def test_bad_task_requests_get_clear_errors(client: httpx.Client) -> None:
    assert client.get("/v1/tasks/task-0123456789abcdef01234567").status_code == 404
    assert client.get("/v1/tasks/..%2F..%2Fetc").status_code == 404
    assert client.delete("/v1/tasks/nope").status_code == 404
    done = wait_done(client, submit(client, prompt="x", max_tokens=2)["task_id"])
    r = client.delete(f"/v1/tasks/{done['task_id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_finished"
    for url in (
        "ftp://example.com/hook",
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://10.0.0.5/hook",
        "http://user:pw@example.com/hook",
    ):
        r = client.post("/v1/inference/async", json={"prompt": "x", "callback_url": url})
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"]["message"].startswith("callback_url")
    r = client.post("/v1/inference/async", json={"prompt": "x", "max_tokens": 100_000})
    assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"]
    r = client.post("/v1/inference/async", json={"model": "minilm", "input": "x", "stream": True})
    assert r.status_code == 422
    r = client.post("/v1/inference/async", json={"model": "no-such-model", "prompt": "x"})
    assert r.status_code == 404


def test_cancelling_a_pending_task_means_it_never_runs(client: httpx.Client) -> None:
    # a queue of generations (the stack's consumer runs 4 at once), the last one
    # cancelled before its turn
    ids = [submit(client, prompt=f"q{i}", max_tokens=64)["task_id"] for i in range(40)]
    r = client.delete(f"/v1/tasks/{ids[-1]}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "CANCELLED"
    assert r.json()["error"]["code"] == "cancelled"
    for task_id in ids[:-1]:
        assert wait_done(client, task_id)["status"] == "COMPLETED"
    cancelled = client.get(f"/v1/tasks/{ids[-1]}").json()
    assert cancelled["status"] == "CANCELLED" and cancelled["started_at"] is None


def test_a_subject_erasure_removes_its_tasks(client: httpx.Client) -> None:
    subject = f"subject-{time.time_ns()}"
    task = submit(client, prompt="about someone", max_tokens=2, subject_id=subject)
    kept = submit(client, prompt="about nobody", max_tokens=2)
    wait_done(client, task["task_id"])
    r = client.post("/v1/data/delete", json={"subject_id": subject})
    assert r.status_code == 200, r.text
    assert r.json()["tasks_removed"] == 1
    assert client.get(f"/v1/tasks/{task['task_id']}").status_code == 404
    assert wait_for(lambda: client.get(f"/v1/tasks/{kept['task_id']}").status_code == 200)


BULK_INDEX = "bulk-kb"


@pytest.fixture(scope="module")
def bulk_index(stack: Any, base_url: str) -> Iterator[str]:
    """An index of this module's own, so bulk writes disturb no other test."""
    state, _ = stack.store.load()
    original = DesiredState(dict(state.models), dict(state.indexes))
    extra = parse_documents([index_doc(BULK_INDEX, "minilm")])
    stack.apply(DesiredState(dict(state.models), {**state.indexes, **extra.indexes}))
    with httpx.Client(base_url=base_url, timeout=120, headers=AUTH) as client:
        probe = {"index": BULK_INDEX, "documents": [{"id": "probe", "text": "probe"}]}
        assert wait_for(lambda: client.post("/v1/data/upsert", json=probe).status_code == 200, 300)
    try:
        yield BULK_INDEX
    finally:
        stack.apply(original)


def test_bulk_ingestion_is_a_task_with_progress(client: httpx.Client, bulk_index: str) -> None:
    docs = [
        {"id": f"doc-{i}", "text": f"Document {i} tells of harbour number {i} and its ships."}
        for i in range(300)
    ]
    docs[7] = {"id": "doc-7", "text": "A lighthouse keeper named Ada.", "subject_id": "ada"}
    r = client.post("/v1/data/upsert", json={"index": bulk_index, "documents": docs, "async": True})
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["kind"] == "upsert"
    assert task["progress"] == {"documents_done": 0, "documents_total": 300, "chunks": 0}
    seen = set()
    while task["status"] not in FINISHED:
        seen.add(task["progress"].get("documents_done"))
        time.sleep(0.05)
        task = client.get(f"/v1/tasks/{task['task_id']}").json()
    assert task["status"] == "COMPLETED", task
    assert task["progress"]["documents_done"] == 300 and task["progress"]["chunks"] >= 300
    assert task["output"] == {"index": bulk_index, "documents": 300, "chunks": 300}
    assert len(seen) > 1, "progress never moved between polls"
    hits = client.post(
        "/v1/data/search", json={"index": bulk_index, "query": "lighthouse keeper", "top_k": 1}
    ).json()["hits"]
    assert hits[0]["document_id"] == "doc-7"
    # erasing the subject removes the task that carried her document, and the document
    r = client.post("/v1/data/delete", json={"subject_id": "ada"})
    assert r.status_code == 200 and r.json()["tasks_removed"] == 1
    assert client.get(f"/v1/tasks/{task['task_id']}").status_code == 404


def test_an_upsert_over_the_per_request_limit_becomes_a_task(
    client: httpx.Client, bulk_index: str, stack: Any
) -> None:
    most = stack.settings.max_documents
    docs = [{"id": f"many-{i}", "text": f"Short note {i}."} for i in range(most + 1)]
    r = client.post("/v1/data/upsert", json={"index": bulk_index, "documents": docs})
    assert r.status_code == 202, r.text[:300]
    task = wait_done(client, r.json()["task_id"], timeout_s=600)
    assert task["status"] == "COMPLETED" and task["output"]["documents"] == most + 1


def test_100k_documents_are_accepted_at_once_and_can_be_cancelled(
    client: httpx.Client, bulk_index: str
) -> None:
    docs = [{"id": f"bulk-{i}", "text": f"Line {i} of a long ledger."} for i in range(100_000)]
    r = client.post("/v1/data/upsert", json={"index": bulk_index, "documents": docs})
    assert r.status_code == 202, r.text[:300]
    task_id = r.json()["task_id"]
    assert r.json()["progress"]["documents_total"] == 100_000

    def done() -> int:
        progress = client.get(f"/v1/tasks/{task_id}").json().get("progress") or {}
        return int(progress.get("documents_done", 0))

    assert wait_for(lambda: done() > 0, 120), "the ingestion never started"
    r = client.delete(f"/v1/tasks/{task_id}")
    assert r.status_code == 200 and r.json()["status"] == "CANCELLED"
    time.sleep(2)  # a step in flight may still land; nothing after it
    stopped = done()
    time.sleep(2)
    assert done() == stopped < 100_000
