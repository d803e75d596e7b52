"""Running tasks on a consumer: claim, execute, finish once, keep leases, recover.

A consumer replica (`gateway/worker.py`) hands each message's task id to `TaskRunner`,
with the function that does the work (`execute`). Everything that makes delivery
exactly once in effect is here, apart from any transport, so it is tested with a plain
Celery worker against every broker (`tests/services/test_task_backends.py`):

- claim the row (`TaskStore.claim`) or do nothing (finished, cancelled, running under a
  live lease elsewhere);
- finish it once, under the claim (a cancelled task, or one taken over, writes nothing);
- renew the leases of running tasks, and stop those whose row is no longer theirs: a
  cancelled task's `execute` is cancelled (its model stream with it);
- send again tasks whose consumer died (lease run out), and, with the embedded broker,
  every task still pending from before this consumer started (that broker forgets the
  messages a killed consumer had taken); a copy finds the task claimed and does nothing;
- remove expired rows; POST the result to its webhook once.

It owns an event loop in a thread of its own: Celery calls `run_blocking` from its
worker threads, and the async clients `execute` uses live on that loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dify_serving.errors import DifyError
from dify_serving.options import TaskOptions
from dify_serving.tasks import webhook
from dify_serving.tasks.queue import EMBEDDED_BROKER_FILE, Publisher
from dify_serving.tasks.store import PENDING, RUNNING, Task, TaskStore

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a task waits, retrying, for a model or index that is loading, restarting or
#: busy (a 503 that says to retry); then it fails with that error.
UNAVAILABLE_WAIT_S = 600.0
#: Seconds between removals of expired task rows (and spent embedded-broker messages).
EXPIRE_EVERY_S = 60.0
#: A delivered message of the embedded broker is deleted after this long.
SPENT_MESSAGE_S = 3600


@dataclass(slots=True)
class Outcome:
    """What a task answered: its output, usage, and (streamed) partial output."""

    output: Any = None
    usage: dict[str, Any] | None = None
    partial: str | None = None
    progress: dict[str, Any] | None = None
    #: What to keep of the request once it ran (a bulk upsert drops its documents).
    request: dict[str, Any] | None = None


@dataclass(slots=True)
class Claim:
    """A running task under this consumer's claim; `report` writes its partial output or
    progress, and is False once the task is no longer ours (cancelled, taken over)."""

    task: Task
    runner: str
    store: TaskStore

    async def report(
        self, *, partial: str | None = None, progress: dict[str, Any] | None = None
    ) -> bool:
        ours = await asyncio.to_thread(
            functools.partial(
                self.store.progress, self.task.id, self.runner, partial=partial, progress=progress
            )
        )
        if ours and progress is not None:
            self.task.progress = progress  # a retry goes on from here
        return ours


Execute = Callable[[Claim], Awaitable[Outcome]]


def task_view(task: Task, queue_position: int | None = None) -> dict[str, Any]:
    """A task as the API (and its webhook) shows it."""
    out: dict[str, Any] = {
        "task_id": task.id,
        "object": "task",
        "kind": task.kind,
        "model": task.model,
        "status": task.status,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "attempts": task.attempts,
    }
    if task.status == PENDING and queue_position is not None:
        out["queue_position"] = queue_position
    if task.status == "COMPLETED":
        out["output"] = task.output
    elif task.partial is not None:  # a streamed generation, as far as it got
        out["output"] = task.partial
    for name in ("error", "usage", "progress", "expires_at"):
        value = getattr(task, name)
        if value is not None:
            out[name] = value
    return out


def transient(exc: DifyError) -> bool:
    """A 503 worth waiting out (loading, restarting, overloaded), not a failed model."""
    return exc.status == 503 and not exc.code.endswith("_failed")


class TaskRunner:
    def __init__(
        self,
        store: TaskStore,
        publisher: Publisher,
        options: TaskOptions,
        home: str,
        queue: str,
        execute: Execute | None = None,
    ) -> None:
        self.store, self.publisher = store, publisher
        self.options, self.home, self.queue = options, home, queue
        self.execute = execute
        self.running: dict[str, tuple[str, asyncio.Task[Any]]] = {}
        self.started = time.time()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tasks", daemon=True)
        self._thread.start()
        self.hooks = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="webhook")
        self._maintenance: concurrent.futures.Future[None] | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the runner's loop (from any thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self, execute: Execute) -> None:
        self.execute = execute
        self._maintenance = self.call(self.maintain())

    # one task ---------------------------------------------------------------------------
    def run_blocking(self, task_id: str) -> None:
        """Run one task to its end (a Celery worker thread waits here)."""
        # cancelled: by its owner, or taken over after a lost lease; either way it is done
        with contextlib.suppress(concurrent.futures.CancelledError):
            self.call(self.run(task_id)).result()

    async def run(self, task_id: str) -> None:
        assert self.execute is not None, "start() the runner first"
        runner = secrets.token_hex(12)
        task = await asyncio.to_thread(
            self.store.claim, task_id, runner, self.options.lease_s, self.options.max_attempts
        )
        if task is None:
            return  # finished, cancelled, or running elsewhere: nothing to do
        job = asyncio.current_task()
        assert job is not None
        self.running[task.id] = (runner, job)
        finish = functools.partial(self.store.finish, task.id, runner)
        try:
            try:
                outcome = await self._execute_when_available(Claim(task, runner, self.store))
            except DifyError as exc:
                error = {"code": exc.code, "message": exc.message}
                done = await asyncio.to_thread(finish, error=error)
            except Exception:
                log.exception("task %s failed", task.id)
                error = {"code": "internal_error", "message": "the task failed; see the logs"}
                done = await asyncio.to_thread(finish, error=error)
            else:
                done = await asyncio.to_thread(
                    functools.partial(
                        finish,
                        output=outcome.output,
                        usage=outcome.usage,
                        partial=outcome.partial,
                        progress=outcome.progress,
                        request=outcome.request,
                    )
                )
        finally:
            self.running.pop(task.id, None)
        if done and task.callback_url:
            await self._callback(task.id, task.callback_url)

    async def _execute_when_available(self, claim: Claim) -> Outcome:
        """`execute`, retried with back-off while what it needs is only briefly away: a
        task queued while its model loads waits for it instead of failing."""
        assert self.execute is not None
        deadline = time.monotonic() + UNAVAILABLE_WAIT_S
        delay = 0.5
        while True:
            try:
                return await self.execute(claim)
            except DifyError as exc:
                if not transient(exc) or time.monotonic() + delay > deadline:
                    raise
                waiting = {**(claim.task.progress or {}), "waiting": exc.message}
                await claim.report(progress=waiting)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _callback(self, task_id: str, url: str) -> None:
        task = await asyncio.to_thread(self.store.get, task_id)
        if task is None:
            return
        body = json.dumps(task_view(task), separators=(",", ":")).encode()
        secret = await asyncio.to_thread(webhook.webhook_secret, self.home)
        allow = self.options.webhook_allow_private
        self.hooks.submit(webhook.deliver, url, body, secret, allow)

    # the loop's own work ----------------------------------------------------------------
    async def maintain(self) -> None:
        options = self.options
        recovering = options.broker == "embedded"
        tick = min(1.0, options.lease_s / 3)
        last_sweep = last_expiry = 0.0
        while True:
            try:
                if recovering:  # until it has gone through once
                    pending = await asyncio.to_thread(self.store.pending, [self.queue])
                    recovering = not await self._send_again(pending, self.started)
                await self.heartbeat()
                now = time.monotonic()
                if now - last_sweep >= options.lease_s / 2:
                    last_sweep = now
                    stale = await asyncio.to_thread(self.store.stale, options.lease_s)
                    await self._send_again(stale, time.time() - options.lease_s)
                if now - last_expiry >= EXPIRE_EVERY_S:
                    last_expiry = now
                    await asyncio.to_thread(self._expire)
            except Exception:  # the store is briefly unreachable: try again next tick
                log.warning("task maintenance failed; retrying", exc_info=True)
            await asyncio.sleep(tick)

    async def heartbeat(self) -> None:
        """Renew the leases of running tasks; stop those no longer ours (cancelled)."""
        claims = {task_id: runner for task_id, (runner, _) in self.running.items()}
        for task_id in await asyncio.to_thread(self.store.heartbeat, claims):
            entry = self.running.get(task_id)
            if entry is not None and entry[0] == claims[task_id]:
                entry[1].cancel()

    async def _send_again(self, task_ids: list[str], not_since: float) -> bool:
        """Send these tasks again (one sweeper does each); False if any send failed, and
        that one is left to be taken by the next sweep."""
        if not task_ids:
            return True
        sent_all = True
        for task_id, queue in await asyncio.to_thread(self.store.redispatch, task_ids, not_since):
            try:
                await self.publisher.publish(task_id, queue)
            except Exception:
                log.warning("could not send task %s again; the next sweep will", task_id)
                await asyncio.to_thread(self.store.undispatch, task_id)
                sent_all = False
        return sent_all

    def _expire(self) -> None:
        self.store.expire()
        if self.options.broker == "embedded":
            path = Path(self.home) / EMBEDDED_BROKER_FILE
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as db, db:
                db.execute(
                    "DELETE FROM kombu_message WHERE visible = 0 AND timestamp < "
                    "datetime('now', ?, 'localtime')",
                    (f"-{SPENT_MESSAGE_S} seconds",),
                )

    def close(self) -> None:
        """Stop the loop's work: running tasks stay RUNNING and are run again elsewhere."""
        if self._maintenance is not None:
            self._maintenance.cancel()
        for _, job in list(self.running.values()):
            self.loop.call_soon_threadsafe(job.cancel)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.hooks.shutdown(wait=False)


__all__ = ["RUNNING", "Claim", "Execute", "Outcome", "TaskRunner", "task_view"]
