"""Data: cleaning, chunking, upserts, searches, erasure (GDPR) and the index list.

The gateway checks the limits (sizes, counts, names) and the key's rights; each index's
own replica does the work, so one index's load never blocks another's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dify_serving.catalog.local import LocalCatalog
from dify_serving.gateway import access, cache_header
from dify_serving.gateway.dataplane import feedback, tasks
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.limits import (
    call_budget,
    check_call_bytes,
    check_call_size,
    json_size,
    utf8_size,
)
from dify_serving.gateway.notes import TEXT_CHARS, note, note_subjects, note_text
from dify_serving.gateway.schemas import MAX_BULK_DOCUMENTS, Document, UpsertRequest
from dify_serving.gateway.state import GatewayState
from dify_serving.layout import index_shard_dir
from dify_serving.render import TASK_MODULES
from dify_serving.security.audit import AuditTrail, AuditUnavailable
from dify_serving.specs import Cleaning, DifyIndex
from dify_serving.tasks.store import Task


async def clean(
    state: GatewayState, text: str, rules: Cleaning, index: str | None, chunk: bool
) -> dict[str, Any]:
    """`text` cleaned as an upsert would clean it; with `chunk`, cut by the index too."""
    size, limit = utf8_size(text), state.options.limits.max_document_bytes
    if size > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"text: {size} bytes; the limit is {limit} (as for one document)",
        )
    chunked = None
    if chunk and index is not None:  # the index cleans and chunks, as on upsert
        check_call_size("text", [text], f"index {index!r}")
        chunked = await state.index_replicas.chunk(index, text)
    cleaned = chunked["text"] if chunked else await state.cleaner.clean(text, rules)
    out: dict[str, Any] = {"text": cleaned, "chars_in": len(text), "chars_out": len(cleaned)}
    if chunked:
        out["chunks"] = chunked["chunks"]
    return out


def _check_documents(
    index: str, documents: list[Document], limit: int, most: int, body_bytes: int | None
) -> None:
    """Counts, sizes and ids of an upsert's documents, each text measured once.

    What the call to the index carries is bounded by the request body itself (its JSON
    holds every text, id and metadata at least as long), so the call's budget is summed
    only when the body is larger than the budget, or of unknown length (chunked).
    """
    if not documents:
        raise ApiError(422, "invalid_request", "documents: give at least one document")
    if len(documents) > most:
        raise ApiError(
            413,
            "payload_too_large",
            f"documents: {len(documents)} in one request; the limit is {most} "
            "(DIFY_MIRROR_MAX_DOCUMENTS)",
        )
    budget = call_budget()
    measure = budget is not None and (body_bytes is None or body_bytes > budget)
    seen: set[str] = set()
    total = 0
    for position, doc in enumerate(documents):
        size = utf8_size(doc.text)
        if size > limit:
            raise ApiError(
                413,
                "payload_too_large",
                f"documents.{position} ({doc.id!r}) is {size} bytes; the limit is {limit} bytes",
            )
        if not doc.text or doc.text.isspace():
            raise ApiError(
                422, "invalid_request", f"documents.{position}.text ({doc.id!r}): must not be empty"
            )
        if doc.id in seen:
            raise ApiError(
                422, "invalid_request", f"documents.{position}.id: {doc.id!r} appears twice"
            )
        seen.add(doc.id)
        if measure:
            total += size + utf8_size(doc.id) + (json_size(doc.metadata) if doc.metadata else 0)
    if measure and budget is not None:
        check_call_bytes("documents", total, f"index {index!r}", budget)


def _documents_text(documents: list[Document]) -> str:
    return "\n\n".join(f"[{d.id}] {d.text[:TEXT_CHARS]}" for d in documents)


async def upsert_or_submit(
    state: GatewayState, body: UpsertRequest, body_bytes: int | None
) -> tuple[bool, dict[str, Any]]:
    """`POST /v1/data/upsert` (and gRPC `Upsert`): (False, what was stored), or (True,
    the task) when the body asks for one or holds more documents than one call takes."""
    if body.async_ or len(body.documents) > state.options.limits.max_documents:
        task = await submit_bulk(state, body.index, body.documents)
        return True, await tasks.view(state, task)
    return False, await upsert(state, body.index, body.documents, body_bytes)


async def upsert(
    state: GatewayState, index: str, documents: list[Document], body_bytes: int | None
) -> dict[str, Any]:
    """Clean, chunk, embed and store `documents` (replacing any of the same id)."""
    state.index(index)
    limits = state.options.limits
    _check_documents(index, documents, limits.max_document_bytes, limits.max_documents, body_bytes)
    note_text(lambda: _documents_text(documents))
    note_subjects(d.subject_id for d in documents)
    result: dict[str, Any] = await state.index_replicas.upsert(
        index, [doc.model_dump() for doc in documents]
    )
    return result


#: Documents a bulk ingestion writes per call to the index (its progress checkpoint).
BULK_SLICE = 64


def _doc_bytes(doc: Document) -> int:
    return (
        utf8_size(doc.text) + utf8_size(doc.id) + (json_size(doc.metadata) if doc.metadata else 0)
    )


def bulk_progress(done: int, total: int, chunks: int) -> dict[str, Any]:
    return {"documents_done": done, "documents_total": total, "chunks": chunks}


async def submit_bulk(state: GatewayState, index: str, documents: list[Document]) -> Task:
    """Bulk ingestion: every document checked now (sizes, ids, text), then one task that
    writes them a slice at a time, its progress checkpointed after each slice."""
    state.index(index)
    limits = state.options.limits
    # body_bytes 0: the whole set is never one call (the task writes it a step at a time,
    # `run_bulk`), but each document must fit into one
    _check_documents(index, documents, limits.max_document_bytes, MAX_BULK_DOCUMENTS, 0)
    budget = call_budget()
    if budget is not None:
        for position, doc in enumerate(documents):
            check_call_bytes(f"documents.{position}", _doc_bytes(doc), f"index {index!r}", budget)
    note_text(lambda: _documents_text(documents[:16]))
    subjects = sorted({d.subject_id for d in documents if d.subject_id})
    note_subjects(d.subject_id for d in documents[:16])  # those whose text is noted
    return await tasks.submit(
        state,
        kind="upsert",
        request={"index": index, "documents": [d.model_dump() for d in documents]},
        subjects=subjects,
        progress=bulk_progress(0, len(documents), 0),
    )


async def run_bulk(
    state: GatewayState, request: dict[str, Any], progress: dict[str, Any] | None, report: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write a bulk ingestion's documents from its last checkpoint on (a task run again
    after a restart re-embeds nothing it already wrote but the slice in flight, which an
    upsert by id replaces); `report(progress)` is False once the task is no longer ours."""
    index, documents = request["index"], request["documents"]
    total = len(documents)
    done = int((progress or {}).get("documents_done", 0))
    chunks = int((progress or {}).get("chunks", 0))
    budget = (call_budget() or 1 << 62) // 2
    while done < total:
        part: list[dict[str, Any]] = []
        size = 0  # at most BULK_SLICE documents, at most half a call's bytes
        for doc in documents[done : done + BULK_SLICE]:
            size += utf8_size(doc["text"]) + utf8_size(doc["id"]) + json_size(doc.get("metadata"))
            if part and size > budget:
                break
            part.append(doc)
        result = await state.index_replicas.upsert(index, part)
        chunks += sum(int(d.get("chunks", 0)) for d in result.get("documents", []))
        done += len(part)
        if not await report(bulk_progress(done, total, chunks)):
            raise asyncio.CancelledError  # cancelled or erased: stop writing
    summary = {"index": index, "documents": total, "chunks": chunks}
    return summary, bulk_progress(done, total, chunks)


async def search(state: GatewayState, index: str, request: dict[str, Any]) -> dict[str, Any]:
    """Nearest chunks to `request["query"]` (text) or `request["vector"]`.

    The index's replica caches its answers (it alone knows when they go stale); the
    gateway tells it the key's scope and whether the client wants a fresh answer.
    """
    state.index(index)
    if (request.get("query") is None) == (request.get("vector") is None):
        raise ApiError(422, "invalid_request", "give exactly one of query (text) or vector")
    started = time.perf_counter()
    note_text(request.get("query"))
    asked = {**request, "cache": cache_header.index_cache_args()}
    result = await state.index_replicas.search(index, asked)
    cache_header.record(result.pop("cache", None))
    result["index"] = index
    result["took_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return result


async def erase(
    state: GatewayState,
    index: str | None,
    document_ids: list[str] | None,
    subject_id: str | None,
    audit: AuditTrail | None = None,
) -> dict[str, Any]:
    """Delete documents from one index, or a subject from every index the key may write,
    and the subject's request text in `audit` (its key destroyed: `audit/seal.py`).

    All or an error: a failure in any index, or in the audit, is a 503 that says what
    was done (deleting again is harmless), and a complete erasure returns a receipt.
    """
    if (document_ids is None) == (subject_id is None):
        raise ApiError(
            422, "invalid_request", "give exactly one of document_ids (with index) or subject_id"
        )
    if document_ids is not None:
        if index is None:
            raise ApiError(422, "invalid_request", "index: required with document_ids")
        if not document_ids:
            raise ApiError(422, "invalid_request", "document_ids: give at least one id")
        targets = [state.index(index).name]
    else:
        # the named index (403 unless the key may write it), or every index this key may
        # write (admin: all of them); the receipt says which
        if index:
            indexes = [state.index(index)]
        else:
            known = state.catalog.indexes()
            indexes = [known[n] for n in access.visible_indexes(sorted(known))]
        targets = [i.name for i in indexes if not _never_stored(state, i)]
    # the subject's tasks first: a bulk upsert still running stops before the indexes
    # are erased (its consumer finds its row gone at the next slice)
    tasks_removed = 0
    if subject_id is not None and any(m in state.options.modules for m in TASK_MODULES):
        store, _ = state.task_backend()
        tasks_removed = await asyncio.to_thread(store.erase_subject, subject_id)
    feedback_removed = 0 if subject_id is None else await feedback.erase_subject(state, subject_id)
    outcomes = await asyncio.gather(
        *(state.index_replicas.delete(n, document_ids, subject_id) for n in targets),
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
        raise _incomplete("; ".join(failed), removed)
    shredded = 0
    if subject_id is not None and audit is not None:
        shredded = await _shred_audit_text(audit, subject_id, removed)
    receipt_id = uuid.uuid4().hex
    what = f"subject {subject_id}" if subject_id else f"{len(document_ids or [])} documents"
    note(
        detail=f"erasure {receipt_id}: {what}; "
        + ", ".join(f"{r['index']}={r['points']}" for r in removed)
        + (f"; audit text keys destroyed={shredded}" if subject_id is not None else "")
    )
    return {
        "receipt_id": receipt_id,
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "subject_id": subject_id,
        "document_ids": document_ids,
        "removed": removed,
        "points_removed": sum(r["points"] for r in removed),
        "tasks_removed": tasks_removed,
        "feedback_removed": feedback_removed,
        "audit_text_shredded": shredded,
    }


async def _shred_audit_text(
    audit: AuditTrail, subject_id: str, removed: list[dict[str, Any]]
) -> int:
    """The subject's audit text keys destroyed; 503 (the rest was done) when it cannot be."""
    try:
        return await asyncio.to_thread(audit.shred, subject_id)
    except AuditUnavailable:
        raise _incomplete("audit text keys (audit database unavailable)", removed) from None


def _incomplete(failed: str, removed: list[dict[str, Any]]) -> ApiError:
    done = ", ".join(f"{r['index']} ({r['points']} points)" for r in removed) or "none"
    return ApiError(
        503,
        "erasure_incomplete",
        f"erasure incomplete; failed: {failed}; done: {done}. Retry the request.",
        headers={"Retry-After": "2"},
    )


def _never_stored(state: GatewayState, index: DifyIndex) -> bool:
    """An index that never ran here has nothing to erase (its shard was never created)."""
    catalog = state.catalog
    if not isinstance(catalog, LocalCatalog) or index.spec.store.type != "embedded":
        return False
    if catalog.serve_options().qdrant_url:  # "embedded" indexes then live on that server
        return False
    if state.status.serving(state.status.indexes, index.name):
        return False
    collection = index.spec.store.collection or index.name
    return not index_shard_dir(Path(state.options.home), collection).exists()


async def list_indexes(state: GatewayState) -> list[dict[str, Any]]:
    """The indexes this key may see: model, store, dimension, points, status."""
    await state.status.refresh()
    indexes = state.catalog.indexes()
    names = access.visible_indexes(sorted(indexes))
    infos = await asyncio.gather(*(state.index_replicas.info(n) for n in names))
    data = []
    for name, info in zip(names, infos, strict=True):
        index, status = indexes[name], state.status.indexes.get(name, {})
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
    return data
