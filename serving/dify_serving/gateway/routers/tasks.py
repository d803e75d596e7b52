"""Async tasks: `POST /v1/inference/async`, then `GET /v1/tasks/{id}` until it ends.

The work is the data plane's (`dataplane/tasks.py`) and, once queued, a task consumer's
(`gateway/worker.py`). Tasks belong to the key that created them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dify_serving.gateway.dataplane import tasks as plane
from dify_serving.gateway.errors import request_id
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import StateDep
from dify_serving.gateway.routers.sse import STREAMS, sse_stream
from dify_serving.gateway.schemas import AsyncInferenceRequest
from dify_serving.security.grants import DATA_WRITE, INFERENCE

router = APIRouter(prefix="/v1", tags=["tasks"])
#: `POST /v1/inference/async`: mounted with the inference module only.
submit_router = APIRouter(prefix="/v1", tags=["inference"])

#: Who may look at tasks at all: a key that can create them (what it sees is its own).
TASK_READER = needs(INFERENCE, DATA_WRITE, any_scope=True)

TaskId = Annotated[str, Path(min_length=1, max_length=64, description="The task's id.")]


def accepted(task: dict[str, Any]) -> JSONResponse:
    """202 with the task and where to poll it."""
    location = f"/v1/tasks/{task['task_id']}"
    return JSONResponse(task, status_code=202, headers={"Location": location})


@submit_router.post(
    "/inference/async",
    status_code=202,
    summary="Run /v1/inference as a task: 202 with its id at once, the result by polling",
    openapi_extra=needs(INFERENCE, generates=True),
)
async def submit(body: AsyncInferenceRequest, state: StateDep) -> JSONResponse:
    return accepted(await plane.submit_inference(state, body))


@router.get(
    "/tasks",
    summary="The caller's tasks, newest first (admin: everyone's)",
    openapi_extra=TASK_READER,
)
async def list_tasks(
    state: StateDep,
    status: Annotated[str | None, Query(max_length=16)] = None,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=plane.MAX_LIST)] = 50,
) -> dict[str, Any]:
    return await plane.listing(state, status, cursor, limit)


@router.get(
    "/tasks/{task_id}",
    summary="A task: status, queue position, partial or final output, error, usage",
    openapi_extra=TASK_READER,
)
async def get_task(task_id: TaskId, state: StateDep) -> dict[str, Any]:
    return await plane.view(state, await plane.find(state, task_id))


@router.delete(
    "/tasks/{task_id}",
    summary="Cancel a pending or running task (409 once it has ended)",
    openapi_extra=TASK_READER,
)
async def cancel_task(task_id: TaskId, state: StateDep) -> dict[str, Any]:
    return await plane.cancel(state, task_id)


@router.get(
    "/tasks/{task_id}/events",
    summary="Follow a task as server-sent events: status, output deltas, then the task",
    openapi_extra=TASK_READER,
    responses=STREAMS,
)
async def task_events(task_id: TaskId, request: Request, state: StateDep) -> StreamingResponse:
    await plane.find(state, task_id)  # 404 now, not inside the stream
    return StreamingResponse(
        sse_stream(plane.follow(state, task_id), request_id(request)),
        media_type="text/event-stream",
    )
