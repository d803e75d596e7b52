"""OpenAI-compatible routes, shaped so the official `openai` client works unchanged."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dify_serving.gateway import dataplane, retrieval
from dify_serving.gateway.errors import ApiError, request_id
from dify_serving.gateway.routers.models import StateDep
from dify_serving.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from dify_serving.specs import Task

router = APIRouter(prefix="/v1", tags=["openai"])


def _usage(result: dict[str, Any]) -> dict[str, int]:
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


@router.post("/chat/completions", summary="OpenAI chat completions (stream too)")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    dataplane.expect_task(model, Task.TEXT_GENERATION)
    messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
    cites = None
    if body.index is not None:  # extension: answer from a knowledge index, with citations
        hits = await retrieval.retrieve(
            state, body.index, retrieval.last_user_text(messages), body.top_k
        )
        messages, cites = retrieval.augment(messages, hits), retrieval.citations(hits)
    gen = dataplane.generation_request(
        model,
        messages=messages,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    cid, created = dataplane.new_id("chatcmpl"), int(time.time())
    base: dict[str, Any] = {"id": cid, "created": created, "model": model.name}
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            dataplane.sse_stream(
                _chat_chunks(state, model, gen, base, usage, cites), request_id(request)
            ),
            media_type="text/event-stream",
        )
    result = await dataplane.generate(state, model, gen)
    return {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": _usage(result),
        **({"citations": cites} if cites is not None else {}),
    }


async def _chat_chunks(
    state: Any,
    model: Any,
    gen: dict[str, Any],
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
    async for item in dataplane.generate_stream(state, model, gen):
        finish = item.get("finish_reason")
        delta = {"content": item["delta"]} if item.get("delta") else {}
        yield {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if finish and usage:
            yield {**chunk, "choices": [], "usage": _usage(item)}


@router.post("/completions", summary="OpenAI text completions (stream too)")
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    dataplane.expect_task(model, Task.TEXT_GENERATION)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(422, "prompt: give one prompt per request", "invalid_request")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(422, "prompt: must not be empty", "invalid_request")
    gen = dataplane.generation_request(
        model,
        prompt=prompt,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    base = {
        "id": dataplane.new_id("cmpl"),
        "created": int(time.time()),
        "model": model.name,
        "object": "text_completion",
    }
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            dataplane.sse_stream(
                _completion_chunks(state, model, gen, base, usage), request_id(request)
            ),
            media_type="text/event-stream",
        )
    result = await dataplane.generate(state, model, gen)
    return {
        **base,
        "choices": [
            {
                "index": 0,
                "text": result["text"],
                "logprobs": None,
                "finish_reason": result["finish_reason"],
            }
        ],
        "usage": _usage(result),
    }


async def _completion_chunks(
    state: Any, model: Any, gen: dict[str, Any], base: dict[str, Any], usage: bool
) -> AsyncIterator[dict[str, Any]]:
    async for item in dataplane.generate_stream(state, model, gen):
        finish = item.get("finish_reason")
        yield {
            **base,
            "choices": [
                {
                    "index": 0,
                    "text": item.get("delta", ""),
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }
        if finish and usage:
            yield {**base, "choices": [], "usage": _usage(item)}


@router.post("/embeddings", summary="OpenAI embeddings (float or base64)")
async def embeddings(body: EmbeddingRequest, state: StateDep) -> Any:
    model = state.model(body.model, Task.FEATURE_EXTRACTION)
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await dataplane.embed(state, model, texts, body.truncate)
    vectors = result["vectors"]
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    tokens = result["prompt_tokens"]
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
