"""`POST /v1/inference`: one route for every task; `stream: true` answers with SSE."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dify_serving.gateway import dataplane
from dify_serving.gateway.errors import ApiError, request_id
from dify_serving.gateway.limits import check_call_size
from dify_serving.gateway.routers.models import StateDep
from dify_serving.gateway.schemas import InferenceRequest, InferenceResponse, Usage
from dify_serving.specs import Task

router = APIRouter(prefix="/v1", tags=["inference"])


@router.post(
    "/inference",
    response_model=InferenceResponse,
    summary="Run a model: text generation (optionally streamed), embeddings, classification",
)
async def inference(body: InferenceRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    rid = request_id(request)
    task = model.spec.task
    if task == Task.TEXT_GENERATION:
        if body.prompt is None:
            raise ApiError(422, "prompt: required for text-generation", "invalid_request")
        gen = dataplane.generation_request(
            model,
            prompt=body.prompt,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        if body.stream:
            return StreamingResponse(
                dataplane.sse_stream(_deltas(state, model, gen, rid), rid),
                media_type="text/event-stream",
            )
        result = await dataplane.generate(state, model, gen)
        return InferenceResponse(
            id=rid,
            model=model.name,
            output=result["text"],
            usage=_usage(result),
            finish_reason=result["finish_reason"],
        )
    if body.stream:
        raise ApiError(422, f"stream: {task} models do not stream", "invalid_request")
    inputs = body.input if body.input is not None else body.prompt
    if inputs is None:
        raise ApiError(422, "input: required for this model", "invalid_request")
    batch = inputs if isinstance(inputs, list) else [inputs]
    if task == Task.FEATURE_EXTRACTION:
        dataplane.check_text_chars("input", batch)
        result = await dataplane.embed(state, model, batch, body.truncate)
        vectors = result["vectors"].tolist()
        return InferenceResponse(
            id=rid,
            model=model.name,
            output=vectors if isinstance(inputs, list) else vectors[0],
            usage=Usage(
                prompt_tokens=result["prompt_tokens"], total_tokens=result["prompt_tokens"]
            ),
        )
    check_call_size("input", batch, f"model {model.name!r}")
    options = {"top_k": body.top_k, "max_tokens": body.max_tokens}
    output = await state.call(model.name, "predict", batch, options)
    return InferenceResponse(
        id=rid,
        model=model.name,
        output=output if isinstance(inputs, list) else output[0],
        usage=Usage(prompt_tokens=0),
    )


def _usage(result: dict[str, Any]) -> Usage:
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def _deltas(state: Any, model: Any, gen: dict[str, Any], rid: str) -> Any:
    index = 0
    async for item in dataplane.generate_stream(state, model, gen):
        if item.get("finish_reason"):
            yield {
                "id": rid,
                "model": model.name,
                "delta": item.get("delta", ""),
                "index": index,
                "finish_reason": item["finish_reason"],
                "usage": _usage(item).model_dump(),
            }
        else:
            yield {"id": rid, "model": model.name, "delta": item["delta"], "index": index}
        index += 1
