"""Knowledge-augmented answers: retrieve chunks, put them in the prompt, cite them.

The retrieved chunks go into one system message, numbered, ahead of the user's own
messages; the model is asked to cite by number, and the response carries the citations
(document id, chunk index, score) whatever the model writes, so clients can always show
sources. The context is bounded in characters so a generous `top_k` cannot overflow a
small model's window.
"""

from __future__ import annotations

from typing import Any

from dify_serving.gateway import access, cache_header
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.state import GatewayState
from dify_serving.security.grants import DATA_READ

#: Characters of retrieved text put into one prompt (about 1,500 tokens).
CONTEXT_CHARS = 6000

INSTRUCTIONS = (
    "Answer the user's question from the numbered context passages below. Cite the "
    "passages you use as [1], [2], ... If the context does not contain the answer, say so."
)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and message.get("content"):
            return str(message["content"])
    raise ApiError(422, "invalid_request", "messages: no user message to answer")


async def retrieve(
    state: GatewayState,
    index: str,
    query: str,
    top_k: int,
    filter: dict[str, Any] | None = None,
    score_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """The index's nearest chunks; chunk text is data, so every route needs `data:read`."""
    access.require_scope(DATA_READ)
    state.index(index)
    request = {
        "query": query,
        "top_k": top_k,
        "filter": filter,
        "score_threshold": score_threshold,
        "cache": cache_header.index_cache_args(),
    }
    result = await state.index_replicas.search(index, request)
    hits: list[dict[str, Any]] = result["hits"]
    return hits


def augment(messages: list[dict[str, Any]], hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the retrieved passages as a numbered system message."""
    passages, used = [], 0
    for number, hit in enumerate(hits, start=1):
        text = hit["text"][: max(0, CONTEXT_CHARS - used)]
        if not text:
            break
        used += len(text)
        passages.append(f"[{number}] ({hit['document_id']}) {text}")
    context = "\n\n".join(passages) or "(no passages found)"
    system = {"role": "system", "content": f"{INSTRUCTIONS}\n\nContext:\n{context}"}
    return [system, *messages]


def citations(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "ref": number,
            "document_id": hit["document_id"],
            "chunk_index": hit["chunk_index"],
            "score": hit["score"],
            "text": hit["text"],
            "metadata": hit.get("metadata") or {},
        }
        for number, hit in enumerate(hits, start=1)
    ]
