"""Async tasks against every broker and store: one suite, real servers.

Brokers: the embedded one (SQLite under the state folder, no server), Redis and
RabbitMQ; task rows in SQLite and PostgreSQL. The consumer is Ray Serve's Celery adapter
as the platform configures it (`tasks/queue.py`) with the platform's `TaskRunner`, in a
subprocess without Ray (`tests/task_worker.py`) so a test can SIGKILL it mid-task. The
same runner inside a Serve replica is covered by `tests/stack/test_tasks_api.py`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import free_port, require_service, wait_for
from webhooks import Hooks

from dify_serving.options import TaskOptions
from dify_serving.tasks import store as rows
from dify_serving.tasks.queue import BrokerUnavailable, Publisher
from dify_serving.tasks.store import TaskStore
from dify_serving.tasks.webhook import webhook_secret

REDIS = "redis://127.0.0.1:6379/13"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
WORKER = Path(__file__).parent.parent / "task_worker.py"


def _probe_tcp(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.fixture(params=["embedded", "redis", "amqp"])
def broker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    kind: str = request.param
    if kind == "redis":
        require_service("Redis", lambda: _probe_tcp(6379))
        monkeypatch.setenv("DIFY_MIRROR_BROKER_URL", REDIS)
    elif kind == "amqp":
        require_service("RabbitMQ", lambda: _probe_tcp(5672))
        monkeypatch.setenv("DIFY_MIRROR_BROKER_URL", AMQP)
    return kind


class Bench:
    """A queue, a store, a publisher and consumer subprocesses over one broker."""

    def __init__(self, home: Path, broker: str, store_url: str, **options: Any) -> None:
        self.home = home
        self.queue = f"test-{uuid.uuid4().hex[:8]}"
        self.options = TaskOptions(broker=broker, **options)  # type: ignore[arg-type]
        self.store_url = store_url
        self.store = TaskStore(store_url, self.options.ttl_s)
        self.publisher = Publisher(home, self.options)
        self.workers: list[subprocess.Popen[str]] = []

    def start_worker(self, concurrency: int = 4) -> subprocess.Popen[str]:
        config = {
            "home": str(self.home),
            "queue": self.queue,
            "store_url": self.store_url,
            "options": self.options.model_dump(),
            "concurrency": concurrency,
            "name": str(len(self.workers)),
        }
        worker = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=os.environ.copy(),
        )
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
        self.workers.append(worker)
        return worker

    def submit(self, value: int, sleep: float = 0.0, **request: Any) -> str:
        callback_url = request.pop("callback_url", None)
        task = self.store.create(
            owner="k1",
            kind="test",
            queue=self.queue,
            request={"value": value, "sleep": sleep, **request},
            callback_url=callback_url,
        )
        self.publisher.publish_sync(task.id, self.queue)
        return task.id

    def status(self, task_id: str) -> str:
        task = self.store.get(task_id)
        assert task is not None
        return task.status

    def runs(self) -> Counter[str]:
        path = self.home / "runs.log"
        return Counter(path.read_text().split()) if path.exists() else Counter()

    def close(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(10)
                except subprocess.TimeoutExpired:
                    worker.kill()
        self.publisher.close()
        self.store.close()


@pytest.fixture
def bench_for(tmp_path: Path, broker: str) -> Iterator[Any]:
    made: list[Bench] = []

    def make(store_url: str | None = None, **options: Any) -> Bench:
        url = store_url or f"sqlite:///{tmp_path / 'tasks.db'}"
        bench = Bench(tmp_path, broker, url, **options)
        made.append(bench)
        return bench

    yield make
    for bench in made:
        bench.close()


def test_every_task_runs_once_and_answers(bench_for: Any) -> None:
    bench = bench_for()
    bench.start_worker()
    ids = [bench.submit(i, sleep=0.02) for i in range(40)]
    assert wait_for(lambda: all(bench.status(t) in rows.FINISHED for t in ids), 60)
    for value, task_id in enumerate(ids):
        task = bench.store.get(task_id)
        assert task is not None
        assert (task.status, task.output, task.attempts) == (rows.COMPLETED, value * 2, 1)
        assert task.started_at is not None and task.finished_at is not None
    assert bench.runs() == Counter(ids)


def test_task_rows_in_postgresql(tmp_path: Path) -> None:
    """The rows in PostgreSQL (the broker does not matter here: the embedded one)."""
    engine = sa.create_engine(POSTGRES.replace("postgresql", "postgresql+psycopg"))
    require_service("PostgreSQL", lambda: engine.connect().close())
    with engine.begin() as db:
        db.execute(sa.text("DROP TABLE IF EXISTS dify_tasks"))
    bench = Bench(tmp_path, "embedded", POSTGRES)
    bench.start_worker()
    ids = [bench.submit(i) for i in range(10)]
    failing = bench.submit(1, fail=True)
    assert wait_for(lambda: all(bench.status(t) in rows.FINISHED for t in [*ids, failing]), 60)
    assert [bench.store.get(t).output for t in ids] == [i * 2 for i in range(10)]  # type: ignore[union-attr]
    failed = bench.store.get(failing)
    assert failed is not None and failed.status == rows.FAILED
    assert failed.error == {"code": "bad_value", "message": "this task fails on purpose"}
    bench.close()


def test_a_killed_consumer_loses_no_task_and_answers_none_twice(
    bench_for: Any, tmp_path: Path
) -> None:
    """SIGKILL a consumer with tasks running and pending; start another: every task ends
    COMPLETED once (the webhook fires once per task), none stays PENDING or RUNNING."""
    hooks = Hooks(webhook_secret(tmp_path))
    bench = bench_for(lease_s=2.0, webhook_allow_private=True)
    first = bench.start_worker(concurrency=3)
    ids = [bench.submit(i, sleep=1.5, callback_url=hooks.url) for i in range(12)]
    assert wait_for(lambda: sum(bench.status(t) == rows.RUNNING for t in ids) >= 3, 30), (
        "the first consumer never ran three tasks at once"
    )
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    interrupted = [t for t in ids if bench.status(t) == rows.RUNNING]
    assert interrupted, "nothing was running when the consumer died"
    bench.start_worker(concurrency=4)
    assert wait_for(lambda: all(bench.status(t) in rows.FINISHED for t in ids), 90), {
        t: bench.status(t) for t in ids
    }
    for value, task_id in enumerate(ids):
        task = bench.store.get(task_id)
        assert task is not None
        assert (task.status, task.output) == (rows.COMPLETED, value * 2)
    for task_id in interrupted:  # run again (a slow machine may take one more lease)
        assert bench.store.get(task_id).attempts >= 2  # type: ignore[union-attr]
    assert wait_for(lambda: len(hooks.received) == len(ids), 30)
    time.sleep(1.0)  # a second answer would arrive now
    assert Counter(body["task_id"] for body in hooks.received) == Counter(ids)
    assert all(body["status"] == rows.COMPLETED for body in hooks.received)
    assert hooks.forged == 0
    hooks.close()


def test_a_task_interrupted_too_often_fails_with_the_reason(bench_for: Any) -> None:
    bench = bench_for(lease_s=2.0, max_attempts=1)
    first = bench.start_worker(concurrency=1)
    task_id = bench.submit(7, sleep=30)
    assert wait_for(lambda: bench.status(task_id) == rows.RUNNING, 30)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    bench.start_worker(concurrency=1)
    assert wait_for(lambda: bench.status(task_id) == rows.FAILED, 60)
    task = bench.store.get(task_id)
    assert task is not None and task.error is not None
    assert task.error["code"] == "interrupted" and "1 times" in task.error["message"]


def test_cancelled_tasks_stop_and_never_answer(bench_for: Any) -> None:
    bench = bench_for()
    bench.start_worker(concurrency=1)
    running = bench.submit(1, sleep=30)
    pending = bench.submit(2, sleep=0)
    assert wait_for(lambda: bench.status(running) == rows.RUNNING, 30)
    assert bench.store.cancel(pending) == rows.CANCELLED
    assert bench.store.cancel(running) == rows.CANCELLED
    # the running one is stopped (its slot frees: a third task runs well before 30 s)
    third = bench.submit(3, sleep=0)
    assert wait_for(lambda: bench.status(third) == rows.COMPLETED, 20)
    assert bench.status(running) == bench.status(pending) == rows.CANCELLED
    assert bench.runs() == Counter([third])
    assert bench.store.cancel(third) == rows.COMPLETED  # finished: not cancelled


@pytest.mark.parametrize("broker", ["redis", "amqp"])  # the embedded one is a file
def test_a_broker_that_is_down_refuses_at_once(
    broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens there
    url = (REDIS if broker == "redis" else AMQP).replace(
        ":6379" if broker == "redis" else ":5672", f":{port}"
    )
    monkeypatch.setenv("DIFY_MIRROR_BROKER_URL", url)
    publisher = Publisher(tmp_path, TaskOptions(broker=broker))  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as refused:
        publisher.publish_sync("task-x", "q")
    assert time.monotonic() - started < 30
    assert str(port) not in str(refused.value) and "guest" not in str(refused.value)
    publisher.close()


def test_a_models_consumers_scale_on_its_queue_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`QueueDepthPolicy` (Ray Serve's `AsyncInferenceAutoscalingPolicy`, the broker URL
    read where it runs) sees the messages waiting in a real Redis queue and asks for
    replicas in proportion: 40 queued at 8 per replica from one replica is 5."""
    import asyncio
    from types import SimpleNamespace

    require_service("Redis", lambda: _probe_tcp(6379))
    monkeypatch.setenv("DIFY_MIRROR_BROKER_URL", REDIS)
    from dify_serving.gateway.worker import QueueDepthPolicy

    queue = f"depth-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(tmp_path, TaskOptions(broker="redis"))
    for i in range(40):
        publisher.publish_sync(f"task-{i}", queue)
    policy = QueueDepthPolicy(str(tmp_path), queue, poll_interval_s=0.0)
    context = SimpleNamespace(
        current_num_replicas=1,
        total_num_requests=0,
        config=SimpleNamespace(get_target_ongoing_requests=lambda: 8),
    )

    async def scale() -> tuple[float, dict[str, Any]]:
        policy(context)  # starts the first poll of the queue
        await asyncio.sleep(0.5)
        return policy(context)  # type: ignore[no-any-return]

    replicas, detail = asyncio.run(scale())
    assert detail["queue_length"] == 40 and replicas == 5
    publisher.close()
    import redis

    redis.Redis.from_url(REDIS).delete(queue)
