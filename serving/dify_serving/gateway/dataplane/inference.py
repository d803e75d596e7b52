"""Inference: generation (whole or streamed), embeddings, prediction.

Validates sampling parameters against the model's limits, fills defaults from its spec,
and calls the model replicas through their typed client.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from dify_serving.engines.protocol import (
    Embedder,
    Embeddings,
    EmbedRequest,
    EngineError,
    Generation,
    GenerationDelta,
    GenerationRequest,
    Generator,
    PredictionRequest,
    Predictor,
)
from dify_serving.gateway.coalesce import EmbedCoalescer
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.limits import check_call_size
from dify_serving.gateway.notes import note, note_text
from dify_serving.gateway.schemas import MAX_TEXT_CHARS
from dify_serving.gateway.state import GatewayState
from dify_serving.specs import DifyModel, Task


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def expect_task(model: DifyModel, *tasks: Task) -> None:
    if model.spec.task not in tasks:
        wanted = " or ".join(str(t) for t in tasks)
        raise ApiError(
            400,
            "wrong_task",
            f"model {model.name!r} is {model.spec.task}, this route needs {wanted}",
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
) -> GenerationRequest:
    """A generation request for the engine, with the model's defaults and limits applied."""
    note_text(prompt if messages is None else lambda: json.dumps(messages[-1:], ensure_ascii=False))
    gen = model.spec.generation
    if max_tokens is not None and max_tokens > gen.max_new_tokens:
        raise ApiError(
            422,
            "invalid_request",
            f"{field}: {max_tokens} is over the limit of model {model.name!r} "
            f"({gen.max_new_tokens})",
        )
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens or gen.max_new_tokens,
        temperature=gen.temperature if temperature is None else temperature,
        top_p=gen.top_p if top_p is None else top_p,
        seed=seed,
    )


async def generate(state: GatewayState, model: DifyModel, request: GenerationRequest) -> Generation:
    result = await state.model_replicas.invoke(model.name, Generator.generate, request)
    note(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
    return result


async def generate_stream(
    state: GatewayState, model: DifyModel, request: GenerationRequest
) -> AsyncIterator[GenerationDelta]:
    replicas = state.model_replicas
    async for delta in replicas.stream(model.name, Generator.generate_stream, request):
        if delta.finish_reason:
            note(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens)
        yield delta


async def embed(
    state: GatewayState, model: DifyModel, texts: list[str], truncate: bool
) -> Embeddings:
    expect_task(model, Task.FEATURE_EXTRACTION)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise ApiError(422, "invalid_request", "input: give one or more non-empty strings")
    note_text(lambda: "\n".join(texts))
    coalescer = state.coalescers.get(model.name)
    if coalescer is None:

        async def call(requests: list[EmbedRequest]) -> list[Embeddings | EngineError]:
            return await state.model_replicas.invoke(model.name, Embedder.embed_each, requests)

        coalescer = state.coalescers[model.name] = EmbedCoalescer(call, model.name)
    note(model=model.name)
    result = await coalescer.embed(texts, truncate)
    note(prompt_tokens=result.prompt_tokens)
    return result


async def predict(state: GatewayState, model: DifyModel, request: PredictionRequest) -> list[Any]:
    """Classification or captioning of a batch (texts, or base64 images)."""
    check_call_size("input", request.inputs, f"model {model.name!r}")
    return await state.model_replicas.invoke(model.name, Predictor.predict, request)


def check_text_chars(field: str, texts: list[str]) -> None:
    """413 for a text over MAX_TEXT_CHARS, for a route whose schema admits longer inputs
    (`/v1/inference` takes base64 images too); the other routes' schemas refuse them."""
    for position, text in enumerate(texts):
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError(
                413,
                "payload_too_large",
                f"{field}.{position}: {len(text)} characters; the limit is {MAX_TEXT_CHARS}",
            )
