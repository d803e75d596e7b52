"""Data: clean, embed, upsert, search, delete (GDPR erasure), indexes, knowledge chat.

The gateway checks the wire format and the limits (sizes, counts, names); each index's
own replica does the work, so one index's load never blocks another's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from dify_serving.gateway import access, dataplane, retrieval
from dify_serving.gateway.errors import ApiError, describe_validation, request_id
from dify_serving.gateway.limits import (
    call_budget,
    check_call_bytes,
    check_call_size,
    json_size,
    utf8_size,
)
from dify_serving.gateway.notes import TEXT_CHARS, note, note_text
from dify_serving.gateway.routers.models import StateDep
from dify_serving.gateway.schemas import (
    CleanRequest,
    DeleteRequest,
    Document,
    EmbedRequest,
    KnowledgeChatRequest,
    SearchRequest,
    UpsertRequest,
)
from dify_serving.gateway.state import GatewayState
from dify_serving.specs import Cleaning, DifyIndex, Task

router = APIRouter(prefix="/v1", tags=["data"])


@router.post("/data/clean", summary="Clean text (and optionally chunk it) as an upsert would")
async def clean(body: CleanRequest, state: StateDep) -> dict[str, Any]:
    if body.index is not None:
        rules = state.index(body.index).spec.cleaning
    else:
        if body.chunk:
            raise ApiError(422, "chunk: needs an index (its tokenizer cuts the chunks)")
        try:
            rules = Cleaning.model_validate(body.rules or {})
        except ValidationError as exc:
            raise ApiError(422, "rules." + describe_validation(exc.errors())) from None
    size, limit = utf8_size(body.text), state.options.limits.max_document_bytes
    if size > limit:
        raise ApiError(413, f"text: {size} bytes; the limit is {limit} (as for one document)")
    chunked = None
    if body.chunk and body.index is not None:  # the index cleans and chunks, as on upsert
        check_call_size("text", [body.text], f"index {body.index!r}")
        chunked = await state.call_index(body.index, "chunk", body.text)
    text = chunked["text"] if chunked else await state.cleaner.clean(body.text, rules)
    out: dict[str, Any] = {"text": text, "chars_in": len(body.text), "chars_out": len(text)}
    if chunked:
        out["chunks"] = chunked["chunks"]
    return out


@router.post("/data/embed", summary="Embed texts with a feature-extraction model")
async def embed(body: EmbedRequest, state: StateDep) -> dict[str, Any]:
    model = state.model(body.model, Task.FEATURE_EXTRACTION)
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await dataplane.embed(state, model, texts, body.truncate)
    vectors = result["vectors"]
    return {
        "model": model.name,
        "dimension": int(vectors.shape[1]) if len(vectors) else 0,
        "data": vectors.tolist(),
        "usage": {"prompt_tokens": result["prompt_tokens"]},
    }


def _check_documents(body: UpsertRequest, limit: int, most: int, body_bytes: int | None) -> None:
    """Counts, sizes and ids of an upsert's documents, each text measured once.

    What the call to the index carries is bounded by the request body itself (its JSON
    holds every text, id and metadata at least as long), so the call's budget is summed
    only when the body is larger than the budget, or of unknown length (chunked).
    """
    if not body.documents:
        raise ApiError(422, "documents: give at least one document")
    if len(body.documents) > most:
        raise ApiError(
            413,
            f"documents: {len(body.documents)} in one request; the limit is {most} "
            "(DIFY_MIRROR_MAX_DOCUMENTS). Use bulk ingestion (POST /v1/data/ingest, coming "
            "with async tasks) or split the request",
        )
    budget = call_budget()
    measure = budget is not None and (body_bytes is None or body_bytes > budget)
    seen: set[str] = set()
    total = 0
    for position, doc in enumerate(body.documents):
        size = utf8_size(doc.text)
        if size > limit:
            raise ApiError(
                413,
                f"documents.{position} ({doc.id!r}) is {size} bytes; the limit is {limit} bytes",
            )
        if not doc.text or doc.text.isspace():
            raise ApiError(422, f"documents.{position}.text ({doc.id!r}): must not be empty")
        if doc.id in seen:
            raise ApiError(422, f"documents.{position}.id: {doc.id!r} appears twice")
        seen.add(doc.id)
        if measure:
            total += size + utf8_size(doc.id) + (json_size(doc.metadata) if doc.metadata else 0)
    if measure and budget is not None:
        check_call_bytes("documents", total, f"index {body.index!r}", budget)


def _documents_text(documents: list[Document]) -> str:
    return "\n\n".join(f"[{d.id}] {d.text[:TEXT_CHARS]}" for d in documents)


@router.post("/data/upsert", summary="Clean, chunk, embed and store documents (replace by id)")
async def upsert(body: UpsertRequest, request: Request, state: StateDep) -> dict[str, Any]:
    state.index(body.index)
    limits = state.options.limits
    length = request.headers.get("content-length", "")
    body_bytes = int(length) if length.isdigit() else None
    _check_documents(body, limits.max_document_bytes, limits.max_documents, body_bytes)
    docs = [doc.model_dump() for doc in body.documents]
    note_text(lambda: _documents_text(body.documents))
    result: dict[str, Any] = await state.call_index(body.index, "upsert", docs)
    return result


@router.post("/data/search", summary="Nearest chunks to a query text or vector")
async def search(body: SearchRequest, state: StateDep) -> dict[str, Any]:
    state.index(body.index)
    if (body.query is None) == (body.vector is None):
        raise ApiError(422, "give exactly one of query (text) or vector")
    started = time.perf_counter()
    note_text(body.query)
    result: dict[str, Any] = await state.call_index(
        body.index, "search", body.model_dump(exclude={"index"})
    )
    result["index"] = body.index
    result["took_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return result


@router.post("/data/delete", summary="Delete documents, or erase a subject in every index")
async def delete(body: DeleteRequest, state: StateDep) -> dict[str, Any]:
    if (body.document_ids is None) == (body.subject_id is None):
        raise ApiError(422, "give exactly one of document_ids (with index) or subject_id")
    if body.document_ids is not None:
        if body.index is None:
            raise ApiError(422, "index: required with document_ids")
        if not body.document_ids:
            raise ApiError(422, "document_ids: give at least one id")
        targets = [state.index(body.index).name]
    else:
        # the named index (403 unless the key may write it), or every index this key may
        # write (admin: all of them); the receipt says which
        if body.index:
            indexes = [state.index(body.index)]
        else:
            known = state.indexes()
            indexes = [known[n] for n in access.visible_indexes(sorted(known))]
        targets = [i.name for i in indexes if not _never_stored(state, i)]
    outcomes = await asyncio.gather(
        *(state.call_index(n, "delete", body.document_ids, body.subject_id) for n in targets),
        return_exceptions=True,
    )
    removed = [
        {"index": n, "points": r}
        for n, r in zip(targets, outcomes, strict=True)
        if isinstance(r, int)
    ]
    failed = [
        f"{n}: {getattr(r, 'message', 'failed; see the server logs')}"
        for n, r in zip(targets, outcomes, strict=True)
        if not isinstance(r, int)
    ]
    if failed:  # an erasure is complete or it is an error; deleting again is harmless
        done = ", ".join(f"{r['index']} ({r['points']} points)" for r in removed) or "none"
        raise ApiError(
            503,
            f"erasure incomplete; failed: {'; '.join(failed)}; done: {done}. Retry the request.",
            "erasure_incomplete",
            headers={"Retry-After": "2"},
        )
    receipt_id = uuid.uuid4().hex
    what = (
        f"subject {body.subject_id}"
        if body.subject_id
        else f"{len(body.document_ids or [])} documents"
    )
    note(
        detail=f"erasure {receipt_id}: {what}; "
        + ", ".join(f"{r['index']}={r['points']}" for r in removed)
    )
    return {
        "receipt_id": receipt_id,
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "subject_id": body.subject_id,
        "document_ids": body.document_ids,
        "removed": removed,
        "points_removed": sum(r["points"] for r in removed),
    }


def _never_stored(state: GatewayState, index: DifyIndex) -> bool:
    """An index that never ran here has nothing to erase (its shard was never created)."""
    name = index.name
    if state.options.control != "local" or index.spec.store.type != "embedded":
        return False
    if state.store.load()[1].qdrant_url:  # "embedded" indexes then live on that server
        return False
    if state.index_statuses.get(name, {}).get("phase") in ("Ready", "Degraded"):
        return False
    collection = index.spec.store.collection or name
    return not (Path(state.options.home) / "indexes" / collection).exists()


@router.get("/indexes", summary="Indexes: model, dimension, points, status")
async def list_indexes(state: StateDep) -> dict[str, Any]:
    await state.refresh_status()
    indexes = state.indexes()
    names = access.visible_indexes(sorted(indexes))
    infos = await asyncio.gather(*(state.info(n, kind="index") for n in names))
    data = []
    for name, info in zip(names, infos, strict=True):
        index, status = indexes[name], state.index_statuses.get(name, {})
        phase, message = status.get("phase", "Pending"), status.get("message")
        if info.get("error"):
            phase, message = "Failed", info["error"]
        data.append(
            {
                "name": name,
                "model": index.spec.embedding_model,
                "store": index.spec.store.type,
                "collection": index.spec.store.collection or name,
                "dimension": info.get("dimension"),
                "points": info.get("points"),
                "status": phase,
                "message": message,
            }
        )
    return {"object": "list", "data": data}


@router.post("/chat", summary="Answer from an index: retrieve, generate, cite (stream too)")
async def chat(body: KnowledgeChatRequest, request: Request, state: StateDep) -> Any:
    model = state.model(body.model)
    dataplane.expect_task(model, Task.TEXT_GENERATION)
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    hits = await retrieval.retrieve(
        state,
        body.index,
        retrieval.last_user_text(messages),
        body.top_k,
        body.filter,
        body.score_threshold,
    )
    gen = dataplane.generation_request(
        model,
        messages=retrieval.augment(messages, hits),
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    base = {"id": dataplane.new_id("chat"), "model": model.name, "index": body.index}
    cites = retrieval.citations(hits)
    if body.stream:
        return StreamingResponse(
            dataplane.sse_stream(_chat_events(state, model, gen, base, cites), request_id(request)),
            media_type="text/event-stream",
        )
    result = await dataplane.generate(state, model, gen)
    return {
        **base,
        "message": {"role": "assistant", "content": result["text"]},
        "citations": cites,
        "finish_reason": result["finish_reason"],
        "usage": {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
        },
    }


async def _chat_events(
    state: GatewayState,
    model: Any,
    gen: dict[str, Any],
    base: dict[str, Any],
    cites: list[dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    yield {**base, "citations": cites}
    async for item in dataplane.generate_stream(state, model, gen):
        event = {**base, "delta": item.get("delta", "")}
        if item.get("finish_reason"):
            event["finish_reason"] = item["finish_reason"]
            event["usage"] = {
                "prompt_tokens": item.get("prompt_tokens", 0),
                "completion_tokens": item.get("completion_tokens", 0),
            }
        yield event
