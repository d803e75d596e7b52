"""Data routes: clean, embed, upsert, search, delete (GDPR erasure), knowledge chat.

The wire format in and out; the work is the data plane's (`dataplane/data.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from dify_serving.engines.protocol import GenerationRequest
from dify_serving.gateway.dataplane import data as plane
from dify_serving.gateway.dataplane import inference, retrieval
from dify_serving.gateway.errors import ApiError, describe_validation, request_id
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import AuditDep, StateDep
from dify_serving.gateway.routers.sse import STREAMS, sse_stream
from dify_serving.gateway.schemas import (
    CleanRequest,
    DeleteRequest,
    EmbedRequest,
    KnowledgeChatRequest,
    SearchRequest,
    UpsertRequest,
)
from dify_serving.gateway.state import GatewayState
from dify_serving.security.grants import DATA_READ, DATA_WRITE, INFERENCE
from dify_serving.specs import Cleaning, DifyModel, Task

router = APIRouter(prefix="/v1", tags=["data"])


@router.post(
    "/data/clean",
    summary="Clean text (and optionally chunk it) as an upsert would",
    openapi_extra=needs(DATA_READ),
)
async def clean(body: CleanRequest, state: StateDep) -> dict[str, Any]:
    if body.index is not None:
        rules = state.index(body.index).spec.cleaning
    else:
        if body.chunk:
            raise ApiError(
                422, "invalid_request", "chunk: needs an index (its tokenizer cuts the chunks)"
            )
        try:
            rules = Cleaning.model_validate(body.rules or {})
        except ValidationError as exc:
            raise ApiError(
                422, "invalid_request", "rules." + describe_validation(exc.errors())
            ) from None
    return await plane.clean(state, body.text, rules, body.index, body.chunk)


@router.post(
    "/data/embed",
    summary="Embed texts with a feature-extraction model",
    openapi_extra=needs(DATA_READ),
)
async def embed(body: EmbedRequest, state: StateDep) -> dict[str, Any]:
    return await inference.embed_texts(state, body)


@router.post(
    "/data/upsert",
    summary="Clean, chunk, embed and store documents (replace by id); many, as a task",
    openapi_extra=needs(DATA_WRITE),
)
async def upsert(body: UpsertRequest, request: Request, state: StateDep) -> Any:
    length = request.headers.get("content-length", "")
    as_task, answer = await plane.upsert_or_submit(
        state, body, int(length) if length.isdigit() else None
    )
    if as_task:
        location = f"/v1/tasks/{answer['task_id']}"
        return JSONResponse(answer, status_code=202, headers={"Location": location})
    return answer


@router.post(
    "/data/search",
    summary="Nearest chunks to a query text or vector",
    openapi_extra=needs(DATA_READ),
)
async def search(body: SearchRequest, state: StateDep) -> dict[str, Any]:
    return await plane.search(state, body.index, body.model_dump(exclude={"index"}))


@router.post(
    "/data/delete",
    summary="Delete documents, or erase a subject in every index",
    openapi_extra=needs(DATA_WRITE, sensitive=True),
)
async def delete(body: DeleteRequest, state: StateDep, audit: AuditDep) -> dict[str, Any]:
    return await plane.erase(state, body.index, body.document_ids, body.subject_id, audit)


@router.post(
    "/chat",
    summary="Answer from an index: retrieve, generate, cite (stream too)",
    openapi_extra=needs(INFERENCE, DATA_READ, generates=True),
    responses=STREAMS,
)
async def chat(body: KnowledgeChatRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    inference.expect_task(model, Task.TEXT_GENERATION)
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    hits = await retrieval.retrieve(
        state,
        body.index,
        retrieval.last_user_text(messages),
        body.top_k,
        body.filter,
        body.score_threshold,
    )
    gen = inference.generation_request(
        model,
        messages=retrieval.augment(messages, hits),
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    base = {"id": inference.new_id("chat"), "model": model.target, "index": body.index}
    cites = retrieval.citations(hits)
    if body.stream:
        return StreamingResponse(
            sse_stream(_chat_events(state, model, gen, base, cites), request_id(request)),
            media_type="text/event-stream",
        )
    result = await inference.generate(state, model, gen)
    return {
        **base,
        "message": {"role": "assistant", "content": result.text},
        "citations": cites,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
        },
    }


async def _chat_events(
    state: GatewayState,
    model: DifyModel,
    gen: GenerationRequest,
    base: dict[str, Any],
    cites: list[dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    yield {**base, "citations": cites}
    async for item in inference.generate_stream(state, model, gen):
        event = {**base, "delta": item.delta}
        if item.finish_reason:
            event["finish_reason"] = item.finish_reason
            event["usage"] = {
                "prompt_tokens": item.prompt_tokens,
                "completion_tokens": item.completion_tokens,
            }
        yield event
