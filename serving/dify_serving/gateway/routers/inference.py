"""`POST /v1/inference`: one route for every task; `stream: true` answers with SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dify_serving.engines.protocol import GenerationRequest, PredictionRequest
from dify_serving.gateway.dataplane import inference as plane
from dify_serving.gateway.errors import ApiError, request_id
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import StateDep
from dify_serving.gateway.routers.sse import sse_stream
from dify_serving.gateway.schemas import InferenceRequest, InferenceResponse, Usage
from dify_serving.gateway.state import GatewayState
from dify_serving.security.grants import INFERENCE
from dify_serving.specs import DifyModel, Task

router = APIRouter(prefix="/v1", tags=["inference"])


@router.post(
    "/inference",
    response_model=InferenceResponse,
    summary="Run a model: text generation (optionally streamed), embeddings, classification",
    openapi_extra=needs(INFERENCE, generates=True),
)
async def inference(body: InferenceRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    rid = request_id(request)
    task = model.spec.task
    if task == Task.TEXT_GENERATION:
        if body.prompt is None:
            raise ApiError(422, "invalid_request", "prompt: required for text-generation")
        gen = plane.generation_request(
            model,
            prompt=body.prompt,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        if body.stream:
            return StreamingResponse(
                sse_stream(_deltas(state, model, gen, rid), rid), media_type="text/event-stream"
            )
        result = await plane.generate(state, model, gen)
        return InferenceResponse(
            id=rid,
            model=model.name,
            output=result.text,
            usage=_usage(result),
            finish_reason=result.finish_reason,
        )
    if body.stream:
        raise ApiError(422, "invalid_request", f"stream: {task} models do not stream")
    inputs = body.input if body.input is not None else body.prompt
    if inputs is None:
        raise ApiError(422, "invalid_request", "input: required for this model")
    batch = inputs if isinstance(inputs, list) else [inputs]
    if task == Task.FEATURE_EXTRACTION:
        plane.check_text_chars("input", batch)
        embedded = await plane.embed(state, model, batch, body.truncate)
        vectors = embedded.vectors.tolist()
        tokens = embedded.prompt_tokens
        return InferenceResponse(
            id=rid,
            model=model.name,
            output=vectors if isinstance(inputs, list) else vectors[0],
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
    predicted = PredictionRequest(batch, top_k=body.top_k, max_tokens=body.max_tokens)
    output = await plane.predict(state, model, predicted)
    return InferenceResponse(
        id=rid,
        model=model.name,
        output=output if isinstance(inputs, list) else output[0],
        usage=Usage(prompt_tokens=0),
    )


def _usage(result: Any) -> Usage:
    p, c = result.prompt_tokens, result.completion_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def _deltas(
    state: GatewayState, model: DifyModel, gen: GenerationRequest, rid: str
) -> AsyncIterator[dict[str, Any]]:
    index = 0
    async for item in plane.generate_stream(state, model, gen):
        if item.finish_reason:
            yield {
                "id": rid,
                "model": model.name,
                "delta": item.delta,
                "index": index,
                "finish_reason": item.finish_reason,
                "usage": _usage(item).model_dump(),
            }
        else:
            yield {"id": rid, "model": model.name, "delta": item.delta, "index": index}
        index += 1
