"""OpenAI-compatible routes, shaped so the official `openai` client works unchanged."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dify_serving.engines.protocol import GenerationRequest
from dify_serving.gateway.dataplane import inference as plane
from dify_serving.gateway.dataplane import retrieval
from dify_serving.gateway.errors import ApiError, request_id
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import StateDep
from dify_serving.gateway.routers.sse import STREAMS, sse_stream
from dify_serving.gateway.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    OpenAIUsage,
)
from dify_serving.gateway.state import GatewayState
from dify_serving.security.grants import INFERENCE
from dify_serving.specs import DifyModel, Task

router = APIRouter(prefix="/v1", tags=["openai"])


def _usage(result: Any) -> OpenAIUsage:
    p, c = result.prompt_tokens, result.completion_tokens
    return OpenAIUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="OpenAI chat completions (stream too)",
    openapi_extra=needs(INFERENCE, generates=True),
    responses=STREAMS,
)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    plane.expect_task(model, Task.TEXT_GENERATION)
    messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
    cites = None
    if body.index is not None:  # extension: answer from a knowledge index, with citations
        hits = await retrieval.retrieve(
            state, body.index, retrieval.last_user_text(messages), body.top_k
        )
        messages, cites = retrieval.augment(messages, hits), retrieval.citations(hits)
    gen = plane.generation_request(
        model,
        messages=messages,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    cid, created = plane.new_id("chatcmpl"), int(time.time())
    base: dict[str, Any] = {"id": cid, "created": created, "model": model.target}
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            sse_stream(_chat_chunks(state, model, gen, base, usage, cites), request_id(request)),
            media_type="text/event-stream",
        )
    result = await plane.generate(state, model, gen)
    return ChatCompletion(
        **base,
        choices=[
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        usage=_usage(result),
        citations=cites,
    )


async def _chat_chunks(
    state: GatewayState,
    model: DifyModel,
    gen: GenerationRequest,
    base: dict[str, Any],
    usage: bool,
    cites: list[dict[str, Any]] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    chunk = {**base, "object": "chat.completion.chunk"}
    yield {
        **chunk,
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        ],
        **({"citations": cites} if cites is not None else {}),
    }
    async for item in plane.generate_stream(state, model, gen):
        finish = item.finish_reason
        delta = {"content": item.delta} if item.delta else {}
        yield {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if finish and usage:
            yield {**chunk, "choices": [], "usage": _usage(item).model_dump()}


@router.post(
    "/completions",
    response_model=Completion,
    summary="OpenAI text completions (stream too)",
    openapi_extra=needs(INFERENCE, generates=True),
    responses=STREAMS,
)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    plane.expect_task(model, Task.TEXT_GENERATION)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(422, "invalid_request", "prompt: give one prompt per request")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(422, "invalid_request", "prompt: must not be empty")
    gen = plane.generation_request(
        model,
        prompt=prompt,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    base = {
        "id": plane.new_id("cmpl"),
        "created": int(time.time()),
        "model": model.target,
        "object": "text_completion",
    }
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            sse_stream(_completion_chunks(state, model, gen, base, usage), request_id(request)),
            media_type="text/event-stream",
        )
    result = await plane.generate(state, model, gen)
    return Completion(
        **base,
        choices=[
            {
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        usage=_usage(result),
    )


async def _completion_chunks(
    state: GatewayState,
    model: DifyModel,
    gen: GenerationRequest,
    base: dict[str, Any],
    usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    async for item in plane.generate_stream(state, model, gen):
        finish = item.finish_reason
        yield {
            **base,
            "choices": [
                {"index": 0, "text": item.delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        if finish and usage:
            yield {**base, "choices": [], "usage": _usage(item).model_dump()}


@router.post(
    "/embeddings",
    response_model=EmbeddingList,
    summary="OpenAI embeddings (float or base64)",
    openapi_extra=needs(INFERENCE),
)
async def embeddings(body: EmbeddingRequest, state: StateDep) -> Any:
    model = state.model(body.model, Task.FEATURE_EXTRACTION)
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await plane.embed(state, model, texts, body.truncate)
    vectors = result.vectors
    if body.encoding_format == "base64":
        data: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    tokens = result.prompt_tokens
    return EmbeddingList(
        data=[{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        model=model.target,
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )
