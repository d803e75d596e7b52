"""Async tasks, the gateway's half: accept, look up, list, cancel, follow.

A task is a row in the task store (`tasks/store.py`) and a message on the broker
(`tasks/queue.py`); a Ray Serve task consumer (`gateway/worker.py`) runs it with this
same data plane. The row is written first and the message sent second: when the broker
refuses, the row is removed and the client gets 503 with `Retry-After`, so a task is
never accepted and then lost.

A task belongs to the key that created it: another key gets 404 for it (not 403: it
learns nothing of other keys' ids), and `admin` sees all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dify_serving.gateway import access
from dify_serving.gateway.dataplane import inference
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.notes import note_subjects
from dify_serving.gateway.schemas import AsyncInferenceRequest, InferenceRequest
from dify_serving.gateway.state import GatewayState
from dify_serving.specs import DifyModel
from dify_serving.specs import Task as ModelTask
from dify_serving.tasks import store as rows
from dify_serving.tasks.queue import SHARED_QUEUE, BrokerUnavailable, model_queue
from dify_serving.tasks.runner import task_view
from dify_serving.tasks.store import Task
from dify_serving.tasks.webhook import CallbackRefused, check_url

#: Seconds between looks at a followed task (`events`).
FOLLOW_INTERVAL_S = 0.2
MAX_LIST = 200


def owner() -> str:
    key = access.current()
    return rows.NOBODY if key is None else key.id


def queue_of(model: DifyModel | None) -> str:
    if model is not None and model.spec.async_inference is not None:
        return model_queue(model.name)
    return SHARED_QUEUE


async def check_callback(state: GatewayState, url: str | None) -> str | None:
    """422 for a callback URL the platform may not POST to (see `tasks/webhook.py`)."""
    if url is None:
        return None
    allow = state.options.tasks.webhook_allow_private
    try:
        return await asyncio.to_thread(check_url, url, allow)
    except CallbackRefused as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


def check_inference(model: DifyModel, body: InferenceRequest) -> None:
    """Refuse now what the task would fail on later (422/413, as `/v1/inference` does)."""
    if model.spec.task == ModelTask.TEXT_GENERATION:
        inference.generation_from(model, body)
        return
    if body.stream:
        raise ApiError(422, "invalid_request", f"stream: {model.spec.task} models do not stream")
    inputs = body.input if body.input is not None else body.prompt
    if inputs is None:
        raise ApiError(422, "invalid_request", "input: required for this model")
    if model.spec.task == ModelTask.FEATURE_EXTRACTION:
        inference.check_text_chars("input", inputs if isinstance(inputs, list) else [inputs])


async def submit_inference(state: GatewayState, body: AsyncInferenceRequest) -> dict[str, Any]:
    """`POST /v1/inference/async`: the task, checked and queued, as the API shows it."""
    model = state.model(body.model)
    check_inference(model, body)
    note_subjects([body.subject_id])
    request = body.model_dump(
        mode="json", exclude={"callback_url", "subject_id"}, exclude_none=True
    )
    # a version is drawn when the task runs, unless the request pinned one
    request["model"] = model.target if "@" in (body.model or "") else model.name
    task = await submit(
        state,
        kind="inference",
        request=request,
        model=model,
        subject_id=body.subject_id,
        callback_url=body.callback_url,
    )
    return await view(state, task)


async def submit(
    state: GatewayState,
    *,
    kind: str,
    request: dict[str, Any],
    model: DifyModel | None = None,
    subject_id: str | None = None,
    subjects: list[str] | None = None,
    callback_url: str | None = None,
    progress: dict[str, Any] | None = None,
) -> Task:
    """Store the task, then queue it; 503 (nothing stored) when the broker is down."""
    callback_url = await check_callback(state, callback_url)
    store, publisher = state.task_backend()
    who = owner()
    limit = state.options.tasks.max_pending_per_key
    if await asyncio.to_thread(store.unfinished, who) >= limit:
        raise ApiError(
            429,
            "too_many_tasks",
            f"this key has {limit} unfinished tasks, the most it may have; wait for some "
            "to finish or cancel them",
            headers={"Retry-After": "5"},
        )
    task = await asyncio.to_thread(
        lambda: store.create(
            owner=who,
            kind=kind,
            queue=queue_of(model),
            request=request,
            model=model.name if model else None,
            subject_id=subject_id,
            subjects=subjects,
            callback_url=callback_url,
            progress=progress,
        )
    )
    try:
        await publisher.publish(task.id, task.queue)
    except BrokerUnavailable:
        await asyncio.to_thread(store.discard, task.id)
        raise ApiError(
            503,
            "broker_unavailable",
            "the task queue is unavailable: the task was not accepted; retry later",
            headers={"Retry-After": "5"},
        ) from None
    return task


async def find(state: GatewayState, task_id: str) -> Task:
    """The caller's task; 404 for an unknown, expired or someone else's one."""
    store, _ = state.task_backend()
    task = await asyncio.to_thread(store.get, task_id) if _plausible(task_id) else None
    if task is None or not (access.is_admin() or task.owner == owner()):
        raise ApiError(404, "task_not_found", f"task {task_id[:64]!r} does not exist")
    return task


def _plausible(task_id: str) -> bool:
    return task_id.startswith("task-") and len(task_id) <= 40 and task_id[5:].isalnum()


async def view(state: GatewayState, task: Task) -> dict[str, Any]:
    """A task as the API shows it (a pending one with its place in the queue)."""
    position = None
    if task.status == rows.PENDING:
        store, _ = state.task_backend()
        position = await asyncio.to_thread(store.queue_position, task)
    return task_view(task, position)


async def cancel(state: GatewayState, task_id: str) -> dict[str, Any]:
    """Cancel a pending or running task (its consumer stops it); 409 once finished."""
    task = await find(state, task_id)
    store, _ = state.task_backend()
    status = await asyncio.to_thread(store.cancel, task.id)
    if status != rows.CANCELLED:
        raise ApiError(
            409, "task_finished", f"task {task.id} already ended {status}; nothing to cancel"
        )
    return await view(state, await find(state, task_id))


async def listing(
    state: GatewayState, status: str | None, cursor: str | None, limit: int
) -> dict[str, Any]:
    """The caller's tasks, newest first (admin: everyone's), `cursor` paging."""
    if status is not None and status not in rows.STATUSES:
        raise ApiError(422, "invalid_request", f"status: one of {', '.join(rows.STATUSES)}")
    before = None
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 18:
            raise ApiError(422, "invalid_request", "cursor: give the next_cursor of a listing")
        before = int(cursor)
    store, _ = state.task_backend()
    who = None if access.is_admin() else owner()
    found = await asyncio.to_thread(store.page, who, status, before, limit + 1)
    page = found[:limit]
    return {
        "object": "list",
        "data": [await view(state, task) for task in page],
        "next_cursor": str(page[-1].seq) if len(found) > limit else None,
    }


async def follow(state: GatewayState, task_id: str) -> AsyncIterator[dict[str, Any]]:
    """Events of a task until it ends: status changes, output deltas, then the result."""
    task = await find(state, task_id)
    store, _ = state.task_backend()
    status, sent = None, 0
    while True:
        if task.status != status:
            status = task.status
            yield {"task_id": task.id, "status": status}
        text = task.partial or ""
        if task.status == rows.COMPLETED and isinstance(task.output, str):
            text = task.output
        if len(text) > sent:
            yield {"task_id": task.id, "delta": text[sent:]}
            sent = len(text)
        if task.status in rows.FINISHED:
            yield await view(state, task)
            return
        await asyncio.sleep(FOLLOW_INTERVAL_S)
        found = await asyncio.to_thread(store.get, task.id)
        if found is None:
            raise ApiError(404, "task_not_found", f"task {task.id} expired or was erased")
        task = found
