"""`POST /v1/inference`: one route for every task; `stream: true` answers with SSE.
`POST /v1/inference/batch`: many of its bodies for one model, answered in order."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dify_serving.gateway.dataplane import batch, tasks
from dify_serving.gateway.dataplane import inference as plane
from dify_serving.gateway.errors import ApiError, request_id
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import StateDep
from dify_serving.gateway.routers.sse import STREAMS, sse_stream
from dify_serving.gateway.schemas import (
    BatchRequest,
    BatchResponse,
    InferenceRequest,
    InferenceResponse,
)
from dify_serving.security.grants import INFERENCE
from dify_serving.specs import Task

router = APIRouter(prefix="/v1", tags=["inference"])


@router.post(
    "/inference",
    response_model=InferenceResponse,
    summary="Run a model: text generation (optionally streamed), embeddings, classification",
    openapi_extra=needs(INFERENCE, generates=True),
    responses=STREAMS,
)
async def inference(body: InferenceRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    rid = request_id(request)
    if body.stream:
        if model.spec.task != Task.TEXT_GENERATION:
            raise ApiError(
                422, "invalid_request", f"stream: {model.spec.task} models do not stream"
            )
        gen = plane.generation_from(model, body)
        return StreamingResponse(
            sse_stream(plane.deltas(state, model, gen, rid), rid), media_type="text/event-stream"
        )
    return await plane.infer(state, model, body, rid)


@router.post(
    "/inference/batch",
    response_model=BatchResponse,
    summary="Run many inference requests for one model together; results in their order",
    openapi_extra=needs(INFERENCE, generates=True),
)
async def inference_batch(body: BatchRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model_name())
    batch.check_count(state, len(body.requests))
    if body.async_:  # one task: 202 now, the results by polling /v1/tasks/{id}
        request_body = body.model_dump(mode="json", exclude={"async_"}, exclude_none=True)
        # a version is drawn when the task runs, unless the request pinned one
        request_body["model"] = model.target if "@" in (body.model_name() or "") else model.name
        task = await tasks.submit(state, kind="batch", request=request_body, model=model)
        view = await tasks.view(state, task)
        return JSONResponse(view, status_code=202, headers={"Location": f"/v1/tasks/{task.id}"})
    return await batch.infer_batch(state, model, body.requests, request_id(request))
