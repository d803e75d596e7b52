"""The task rows' state machine, the webhook's address rules, and a broker that is down.

What makes delivery exactly once in effect is the store's conditional updates: these
tests drive them directly with a clock of their own (SQLite; PostgreSQL and the brokers
are `tests/services/test_task_backends.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dify_serving.tasks import store as rows
from dify_serving.tasks.store import TaskStore
from dify_serving.tasks.webhook import CallbackRefused, check_url, deliver, signature


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> TaskStore:
    return TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", ttl_s=3600, clock=clock)


def new(store: TaskStore, owner: str = "k1", **extra: Any) -> str:
    return store.create(owner=owner, kind="inference", queue="q", request={"x": 1}, **extra).id


def test_one_claim_wins_and_a_copy_of_the_message_does_nothing(store: TaskStore) -> None:
    task_id = new(store)
    first = store.claim(task_id, "r1", lease_s=30, max_attempts=3)
    assert first is not None and first.status == rows.RUNNING and first.attempts == 1
    assert store.claim(task_id, "r2", lease_s=30, max_attempts=3) is None
    assert store.finish(task_id, "r2", output="theirs") is False
    assert store.finish(task_id, "r1", output="mine") is True
    assert store.finish(task_id, "r1", output="again") is False  # answered once
    assert store.claim(task_id, "r3", lease_s=30, max_attempts=3) is None
    done = store.get(task_id)
    assert done is not None and (done.status, done.output) == (rows.COMPLETED, "mine")


def test_a_silent_runner_loses_its_task_and_cannot_finish_it(
    store: TaskStore, clock: Clock
) -> None:
    task_id = new(store)
    assert store.claim(task_id, "dead", lease_s=30, max_attempts=3) is not None
    clock.now += 10
    assert store.stale(lease_s=30) == []
    assert store.heartbeat({task_id: "dead"}) == set()  # still ours: renewed
    clock.now += 31
    assert store.stale(lease_s=30) == [task_id]
    retaken = store.claim(task_id, "alive", lease_s=30, max_attempts=3)
    assert retaken is not None and retaken.attempts == 2
    assert store.heartbeat({task_id: "dead"}) == {task_id}  # the old runner learns it
    assert store.progress(task_id, "dead", partial="stale") is False
    assert store.finish(task_id, "dead", output="late") is False
    assert store.finish(task_id, "alive", output="fresh") is True


def test_after_max_attempts_a_task_fails_with_the_reason(store: TaskStore, clock: Clock) -> None:
    task_id = new(store)
    for attempt in range(2):
        assert store.claim(task_id, f"r{attempt}", lease_s=5, max_attempts=2) is not None
        clock.now += 6
    assert store.claim(task_id, "r9", lease_s=5, max_attempts=2) is None
    failed = store.get(task_id)
    assert failed is not None and failed.status == rows.FAILED
    assert failed.error is not None and failed.error["code"] == "interrupted"
    assert "2 times" in failed.error["message"]


def test_cancel_stops_pending_and_running_tasks_but_not_finished_ones(store: TaskStore) -> None:
    pending, running, finished = new(store), new(store), new(store)
    store.claim(running, "r", lease_s=30, max_attempts=3)
    store.claim(finished, "f", lease_s=30, max_attempts=3)
    store.finish(finished, "f", output=1)
    assert store.cancel(pending) == rows.CANCELLED
    assert store.claim(pending, "late", lease_s=30, max_attempts=3) is None
    assert store.cancel(running) == rows.CANCELLED
    assert store.heartbeat({running: "r"}) == {running}  # its runner stops it
    assert store.finish(running, "r", output="too late") is False
    assert store.cancel(finished) == rows.COMPLETED
    assert store.cancel("task-unknown") is None


def test_queue_position_listing_and_cursor(store: TaskStore) -> None:
    ids = [new(store) for _ in range(5)]
    other = new(store, owner="k2")
    positions = [store.queue_position(store.get(t)) for t in ids]  # type: ignore[arg-type]
    assert positions == [0, 1, 2, 3, 4]
    store.claim(ids[0], "r", lease_s=30, max_attempts=3)
    assert store.queue_position(store.get(ids[1])) == 0  # type: ignore[arg-type]
    page = store.page("k1", limit=2)
    assert [t.id for t in page] == ids[:-3:-1]
    rest = store.page("k1", before=page[-1].seq, limit=10)
    assert [t.id for t in rest] == ids[2::-1]
    assert [t.id for t in store.page("k1", status=rows.RUNNING)] == [ids[0]]
    assert other in [t.id for t in store.page(None)]
    assert store.unfinished("k1") == 5 and store.unfinished("k2") == 1


def test_results_expire_after_the_ttl(store: TaskStore, clock: Clock) -> None:
    task_id = new(store)
    store.claim(task_id, "r", lease_s=30, max_attempts=3)
    store.finish(task_id, "r", output="x")
    clock.now += 3599
    assert store.get(task_id) is not None
    clock.now += 2
    assert store.get(task_id) is None
    assert store.page("k1") == []
    assert store.expire() == 1


def test_a_subject_erasure_removes_its_tasks(store: TaskStore) -> None:
    about, other = new(store, subject_id="s-1"), new(store)
    assert store.erase_subject("s-1") == 1
    assert store.get(about) is None and store.get(other) is not None


def test_redispatch_is_taken_by_one_sweeper(store: TaskStore, clock: Clock) -> None:
    task_id = new(store)
    clock.now += 100
    assert store.redispatch([task_id], not_since=clock.now - 10) == [(task_id, "q")]
    assert store.redispatch([task_id], not_since=clock.now - 10) == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://127.0.0.1/x",
        "http://localhost:8000/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/x",
        "http://192.168.0.1/x",
        "http://[::1]/x",
        "http://[fe80::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://0.0.0.0/x",
        "http://user:secret@example.com/x",
        "http:///nohost",
        "https://" + "a" * 2100 + ".com/",
    ],
)
def test_callback_urls_that_point_inward_are_refused(url: str) -> None:
    with pytest.raises(CallbackRefused) as refused:
        check_url(url, allow_private=False)
    assert str(refused.value).startswith("callback_url:")
    assert "secret" not in str(refused.value)


def test_public_and_allowed_private_callbacks_pass() -> None:
    assert check_url("https://93.184.215.14/hook", allow_private=False)
    assert check_url("http://127.0.0.1:9/x", allow_private=True)


def test_delivery_retries_with_back_off_and_signs_the_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx

    sent: list[tuple[bytes, str]] = []
    answers = iter([503, 500, 204])

    def post(url: str, content: bytes, headers: dict[str, str], **_: Any) -> httpx.Response:
        sent.append((content, headers["X-Dify-Signature"]))
        return httpx.Response(next(answers))

    monkeypatch.setattr(httpx, "post", post)
    waits: list[float] = []
    assert deliver("http://127.0.0.1:1/h", b'{"a":1}', b"k", True, sleep=waits.append)
    assert waits == [1.0, 2.0]
    assert sent == [(b'{"a":1}', signature(b"k", b'{"a":1}'))] * 3
    assert signature(b"k", b'{"a":1}').startswith("sha256=")


def test_a_bulk_ingestion_resumes_from_its_checkpoint_and_stops_when_cancelled() -> None:
    """Run again after a restart, it writes only what its last checkpoint had not; once
    its task is no longer its own (cancelled, erased) it writes nothing more."""
    import asyncio
    from types import SimpleNamespace

    from dify_serving.gateway.dataplane.data import BULK_SLICE, run_bulk

    written: list[list[str]] = []

    async def upsert(index: str, documents: list[dict[str, Any]]) -> dict[str, Any]:
        written.append([d["id"] for d in documents])
        return {"documents": [{"id": d["id"], "chunks": 2} for d in documents]}

    state = SimpleNamespace(index_replicas=SimpleNamespace(upsert=upsert))
    docs = [{"id": str(i), "text": "t"} for i in range(3 * BULK_SLICE + 5)]
    request = {"index": "kb", "documents": docs}
    reports: list[dict[str, Any]] = []

    async def report(progress: dict[str, Any]) -> bool:
        reports.append(progress)
        return True

    start = {"documents_done": BULK_SLICE, "documents_total": len(docs), "chunks": 7}
    summary, final = asyncio.run(run_bulk(state, request, start, report))  # type: ignore[arg-type]
    assert written[0][0] == str(BULK_SLICE)  # the first slice was not written again
    assert sum(map(len, written)) == len(docs) - BULK_SLICE
    assert final["documents_done"] == len(docs)
    assert summary["chunks"] == 7 + 2 * (len(docs) - BULK_SLICE)
    assert [r["documents_done"] for r in reports][-1] == len(docs)

    written.clear()

    async def gone(progress: dict[str, Any]) -> bool:
        return False

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run_bulk(state, request, None, gone))  # type: ignore[arg-type]
    assert len(written) == 1  # one slice, then it noticed and stopped
