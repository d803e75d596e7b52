"""The work behind the routes, apart from any transport (REST now, gRPC later).

Validates sampling parameters against the model's limits, fills defaults from its spec,
and calls the model replicas. Routers only translate wire formats.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from dify_serving.engines.base import EngineError
from dify_serving.gateway.coalesce import EmbedCoalescer
from dify_serving.gateway.errors import ApiError, error_body
from dify_serving.gateway.notes import note, note_text, note_usage
from dify_serving.gateway.schemas import MAX_TEXT_CHARS
from dify_serving.gateway.state import GatewayState
from dify_serving.specs import DifyModel, Task

log = logging.getLogger("dify_serving.gateway")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def expect_task(model: DifyModel, *tasks: Task) -> None:
    if model.spec.task not in tasks:
        wanted = " or ".join(str(t) for t in tasks)
        raise ApiError(
            400,
            f"model {model.name!r} is {model.spec.task}, this route needs {wanted}",
            "wrong_task",
        )


def generation_request(
    model: DifyModel,
    *,
    prompt: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    field: str = "max_tokens",
) -> dict[str, Any]:
    """A generation request for the engine, with the model's defaults and limits applied."""
    note_text(prompt if messages is None else lambda: json.dumps(messages[-1:], ensure_ascii=False))
    gen = model.spec.generation
    if max_tokens is not None and max_tokens > gen.max_new_tokens:
        raise ApiError(
            422,
            f"{field}: {max_tokens} is over the limit of model {model.name!r} "
            f"({gen.max_new_tokens})",
            "invalid_request",
        )
    return {
        "prompt": prompt,
        "messages": messages,
        "max_tokens": max_tokens or gen.max_new_tokens,
        "temperature": gen.temperature if temperature is None else temperature,
        "top_p": gen.top_p if top_p is None else top_p,
        "seed": seed,
    }


async def generate(
    state: GatewayState, model: DifyModel, request: dict[str, Any]
) -> dict[str, Any]:
    result: dict[str, Any] = await state.call(model.name, "generate", request)
    note_usage(result)
    return result


async def generate_stream(
    state: GatewayState, model: DifyModel, request: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    async for item in state.stream(model.name, "generate_stream", request):
        if item.get("finish_reason"):
            note_usage(item)
        yield item


async def embed(
    state: GatewayState, model: DifyModel, texts: list[str], truncate: bool
) -> dict[str, Any]:
    expect_task(model, Task.FEATURE_EXTRACTION)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise ApiError(422, "input: give one or more non-empty strings", "invalid_request")
    note_text(lambda: "\n".join(texts))
    coalescer = state.coalescers.get(model.name)
    if coalescer is None:

        async def call(requests: list[tuple[list[str], bool, int]]) -> list[dict[str, Any]]:
            results: list[dict[str, Any]] = await state.call(model.name, "embed_each", requests)
            return results

        coalescer = state.coalescers[model.name] = EmbedCoalescer(call, model.name)
    note(model=model.name)
    result = await coalescer.embed(texts, truncate)
    note_usage(result)
    return result


def check_text_chars(field: str, texts: list[str]) -> None:
    """413 for a text over MAX_TEXT_CHARS, for a route whose schema admits longer inputs
    (`/v1/inference` takes base64 images too); the other routes' schemas refuse them."""
    for position, text in enumerate(texts):
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError(
                413,
                f"{field}.{position}: {len(text)} characters; the limit is {MAX_TEXT_CHARS}",
            )


def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


async def sse_stream(chunks: AsyncIterator[Any], request_id: str) -> AsyncIterator[bytes]:
    """Frame chunks as SSE; an error mid-stream becomes an `error` event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except (ApiError, EngineError) as exc:
        yield sse(error_body(exc.code, exc.message, request_id), event="error")
    except Exception:  # never leave a client hanging on a broken stream
        log.exception("stream %s failed", request_id)
        message = "the stream failed; see the server logs"
        yield sse(error_body("internal_error", message, request_id), event="error")
    yield sse("[DONE]")
