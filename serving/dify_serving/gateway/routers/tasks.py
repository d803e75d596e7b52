"""Async tasks: `POST /v1/inference/async`, then `GET /v1/tasks/{id}` until it ends.

The work is the data plane's (`dataplane/tasks.py`) and, once queued, a task consumer's
(`gateway/worker.py`). Tasks belong to the key that created them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from dify_serving.gateway.dataplane import inference as inference_plane
from dify_serving.gateway.dataplane import tasks as plane
from dify_serving.gateway.errors import ApiError, request_id
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import StateDep
from dify_serving.gateway.routers.sse import sse_stream
from dify_serving.gateway.schemas import ID_CHARS, InferenceRequest
from dify_serving.security.grants import DATA_WRITE, INFERENCE
from dify_serving.specs import DifyModel, Task
from dify_serving.tasks.webhook import MAX_URL_CHARS

router = APIRouter(prefix="/v1", tags=["tasks"])
#: `POST /v1/inference/async`: mounted with the inference module only.
submit_router = APIRouter(prefix="/v1", tags=["inference"])

#: Who may look at tasks at all: a key that can create them (what it sees is its own).
TASK_READER = needs(INFERENCE, DATA_WRITE, any_scope=True)

TaskId = Annotated[str, Path(min_length=1, max_length=64, description="The task's id.")]


class AsyncInferenceRequest(InferenceRequest):
    """`/v1/inference`'s body, run as a task; `stream` makes its partial output visible."""

    callback_url: str | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        description="POST the finished task here, signed (X-Dify-Signature: sha256=HMAC).",
    )
    subject_id: str | None = Field(
        None,
        min_length=1,
        max_length=ID_CHARS,
        description="Data subject the request is about: erasing the subject removes the task.",
    )


def check_inference(model: DifyModel, body: InferenceRequest) -> None:
    """Refuse now what the task would fail on later (422/413, as `/v1/inference` does)."""
    if model.spec.task == Task.TEXT_GENERATION:
        inference_plane.generation_from(model, body)
        return
    if body.stream:
        raise ApiError(422, "invalid_request", f"stream: {model.spec.task} models do not stream")
    inputs = body.input if body.input is not None else body.prompt
    if inputs is None:
        raise ApiError(422, "invalid_request", "input: required for this model")
    if model.spec.task == Task.FEATURE_EXTRACTION:
        inference_plane.check_text_chars("input", inputs if isinstance(inputs, list) else [inputs])


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
    model = state.model(body.model)
    check_inference(model, body)
    request = body.model_dump(
        mode="json", exclude={"callback_url", "subject_id"}, exclude_none=True
    )
    # a version is drawn when the task runs, unless the request pinned one
    request["model"] = model.target if "@" in (body.model or "") else model.name
    task = await plane.submit(
        state,
        kind="inference",
        request=request,
        model=model,
        subject_id=body.subject_id,
        callback_url=body.callback_url,
    )
    return accepted(await plane.view(state, task))


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
)
async def task_events(task_id: TaskId, request: Request, state: StateDep) -> StreamingResponse:
    await plane.find(state, task_id)  # 404 now, not inside the stream
    return StreamingResponse(
        sse_stream(plane.follow(state, task_id), request_id(request)),
        media_type="text/event-stream",
    )
