"""Inference: generation (whole or streamed), embeddings, prediction.

Validates sampling parameters against the model's limits, fills defaults from its spec,
and calls the model replicas through their typed client.

Answers that only their inputs decide come from the result cache (`tasks/cache.py`)
when they can: a whole generation at temperature 0 or with a seed, and embeddings.
The key holds the model's tag (name and the spec fields an answer depends on, so a new
revision misses), the engine request with the model's defaults applied, the input and
the key's resource scope. Streams are never cached. `cache_header.py` says HIT or MISS.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

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
from dify_serving.gateway import cache_header, schemas
from dify_serving.gateway.coalesce import EmbedCoalescer
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.limits import check_call_size
from dify_serving.gateway.notes import note, note_text
from dify_serving.gateway.schemas import (
    MAX_TEXT_CHARS,
    InferenceRequest,
    InferenceResponse,
    Usage,
)
from dify_serving.gateway.state import GatewayState
from dify_serving.specs import DifyModel, Task
from dify_serving.tasks.cache import cache_key, model_tag


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def expect_task(model: DifyModel, *tasks: Task) -> None:
    if model.spec.task not in tasks:
        wanted = " or ".join(str(t) for t in tasks)
        raise ApiError(
            400,
            "wrong_task",
            f"model {model.target!r} is {model.spec.task}, this route needs {wanted}",
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
            f"{field}: {max_tokens} is over the limit of model {model.target!r} "
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
    """The whole generation; from the cache when deterministic (temperature 0 or a seed)."""
    key = None
    if state.cache.enabled and (request.temperature == 0 or request.seed is not None):
        key = cache_key(
            "generate", model_tag(model.target, model.spec), request, cache_header.key_scope()
        )
        cached = await cache_header.lookup(state.cache, key)
        if cached is not None:
            text, finish, prompt_tokens, completion_tokens = json.loads(cached)
            note(
                model=model.target, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
            )
            return Generation(text, finish, prompt_tokens, completion_tokens)
    result = await state.model_replicas.invoke(model.target, Generator.generate, request)
    note(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
    if key is not None:
        answer = [result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens]
        await cache_header.store(state.cache, key, json.dumps(answer).encode())
    return result


async def generate_stream(
    state: GatewayState, model: DifyModel, request: GenerationRequest
) -> AsyncIterator[GenerationDelta]:
    replicas = state.model_replicas
    async for delta in replicas.stream(model.target, Generator.generate_stream, request):
        if delta.finish_reason:
            note(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens)
        yield delta


async def deltas(
    state: GatewayState, model: DifyModel, request: GenerationRequest, rid: str
) -> AsyncIterator[dict[str, Any]]:
    """A stream's events as `/v1/inference` sends them (SSE) and `GenerateTextStream`
    (gRPC): one per delta, the last with `finish_reason` and `usage`."""
    index = 0
    async for item in generate_stream(state, model, request):
        event = {"id": rid, "model": model.target, "delta": item.delta, "index": index}
        if item.finish_reason:
            event["finish_reason"] = item.finish_reason
            event["usage"] = usage(item).model_dump()
        yield event
        index += 1


async def embed(
    state: GatewayState, model: DifyModel, texts: list[str], truncate: bool
) -> Embeddings:
    expect_task(model, Task.FEATURE_EXTRACTION)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise ApiError(422, "invalid_request", "input: give one or more non-empty strings")
    note_text(lambda: "\n".join(texts))
    coalescer = state.coalescers.get(model.target)
    if coalescer is None:

        async def call(requests: list[EmbedRequest]) -> list[Embeddings | EngineError]:
            return await state.model_replicas.invoke(model.target, Embedder.embed_each, requests)

        coalescer = state.coalescers[model.target] = EmbedCoalescer(call, model.target)
    note(model=model.target)
    key = None
    if state.cache.enabled:
        tag = model_tag(model.target, model.spec)
        key = cache_key("embed", tag, texts, truncate, cache_header.key_scope())
        cached = await cache_header.lookup(state.cache, key)
        if cached is not None:
            result = _embeddings_from(cached)
            note(prompt_tokens=result.prompt_tokens)
            return result
    result = await coalescer.embed(texts, truncate)
    note(prompt_tokens=result.prompt_tokens)
    if key is not None:
        await cache_header.store(state.cache, key, _embeddings_bytes(result))
    return result


async def embed_texts(state: GatewayState, body: schemas.EmbedRequest) -> dict[str, Any]:
    """`POST /v1/data/embed` (and gRPC `Embed`): the vectors of `body.input`."""
    model = state.model(body.model, Task.FEATURE_EXTRACTION)
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await embed(state, model, texts, body.truncate)
    vectors = result.vectors
    return {
        "model": model.target,
        "dimension": int(vectors.shape[1]) if len(vectors) else 0,
        "data": vectors.tolist(),
        "usage": {"prompt_tokens": result.prompt_tokens},
    }


#: prompt tokens, rows, dimension; then the vectors as little-endian float32.
_EMBEDDINGS_HEAD = struct.Struct("<qii")


def _embeddings_bytes(result: Embeddings) -> bytes:
    vectors = np.ascontiguousarray(result.vectors, dtype="<f4")
    rows, dimension = vectors.shape
    return _EMBEDDINGS_HEAD.pack(result.prompt_tokens, rows, dimension) + vectors.tobytes()


def _embeddings_from(data: bytes) -> Embeddings:
    tokens, rows, dimension = _EMBEDDINGS_HEAD.unpack_from(data)
    flat = np.frombuffer(data, dtype="<f4", offset=_EMBEDDINGS_HEAD.size)
    return Embeddings(flat.reshape(rows, dimension).astype(np.float32), tokens)


async def predict(state: GatewayState, model: DifyModel, request: PredictionRequest) -> list[Any]:
    """Classification or captioning of a batch (texts, or base64 images)."""
    check_call_size("input", request.inputs, f"model {model.target!r}")
    return await state.model_replicas.invoke(model.target, Predictor.predict, request)


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


def generation_from(model: DifyModel, body: InferenceRequest) -> GenerationRequest:
    """The engine request of a `/v1/inference` body for a text-generation model."""
    if body.prompt is None:
        raise ApiError(422, "invalid_request", "prompt: required for text-generation")
    return generation_request(
        model,
        prompt=body.prompt,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )


def usage(result: Generation | GenerationDelta) -> Usage:
    p, c = result.prompt_tokens, result.completion_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def infer(
    state: GatewayState, model: DifyModel, body: InferenceRequest, rid: str
) -> InferenceResponse:
    """One `/v1/inference` body, answered whole (any task): what the sync route, a batch
    item and an async task all run."""
    task = model.spec.task
    if task == Task.TEXT_GENERATION:
        result = await generate(state, model, generation_from(model, body))
        return InferenceResponse(
            id=rid,
            model=model.target,
            output=result.text,
            usage=usage(result),
            finish_reason=result.finish_reason,
        )
    inputs = body.input if body.input is not None else body.prompt
    if inputs is None:
        raise ApiError(422, "invalid_request", "input: required for this model")
    batch = inputs if isinstance(inputs, list) else [inputs]
    if task == Task.FEATURE_EXTRACTION:
        check_text_chars("input", batch)
        embedded = await embed(state, model, batch, body.truncate)
        vectors = embedded.vectors.tolist()
        tokens = embedded.prompt_tokens
        return InferenceResponse(
            id=rid,
            model=model.target,
            output=vectors if isinstance(inputs, list) else vectors[0],
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
    predicted = PredictionRequest(batch, top_k=body.top_k, max_tokens=body.max_tokens)
    output = await predict(state, model, predicted)
    return InferenceResponse(
        id=rid,
        model=model.target,
        output=output if isinstance(inputs, list) else output[0],
        usage=Usage(prompt_tokens=0),
    )
