"""Batch inference: many `/v1/inference` bodies for one model, answered in one response.

The items run concurrently through the same `inference.infer` as the single route, so
they reach the model together: its engine batches generations continuously and the
embedding coalescer merges texts into shared calls; nothing here batches on its own. At
most as many items run at once as the model's replicas have slots: a batch larger than
that waits its turn here rather than filling the gateway's in-flight bound, whose
overflow is a 503 meant for callers that retry (`inflight.py`).

One item's failure is its own: its result carries the code and message the same body
would get from `/v1/inference`; an unexpected exception becomes `internal_error` without
its text (the traceback goes to the log), as `errors.install` answers one. The whole
request fails only for what no item can do without: the model unknown or forbidden
(before this module), not serving (checked once, up front), or unavailable for every
item (each failed with a 503: the first one is the answer, Retry-After included).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from dify_serving.errors import DifyError
from dify_serving.gateway.dataplane import inference as plane
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.inflight import QUEUED_PER_SLOT, model_bound
from dify_serving.gateway.notes import TEXT_CHARS, note, note_text
from dify_serving.gateway.schemas import (
    BatchItemError,
    BatchItemFailed,
    BatchItemOk,
    BatchResponse,
    BatchResult,
    InferenceRequest,
    InferenceResponse,
    Usage,
)
from dify_serving.gateway.state import GatewayState
from dify_serving.specs import DifyModel, Task

log = logging.getLogger(__name__)

#: What an unexpected exception in one item answers (the text `errors.install` uses).
INTERNAL = ("internal_error", "internal error; see server logs")


def check_count(state: GatewayState, count: int) -> None:
    """413 naming the limit for a batch over `max_batch_requests` (the operator's option)."""
    limit = state.options.limits.max_batch_requests
    if count > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"requests: {count} in one batch; the limit is {limit} "
            "(DIFY_MIRROR_MAX_BATCH_REQUESTS); split the batch",
        )


def slots(model: DifyModel) -> int:
    """Calls the model's replicas run at once (its in-flight bound, less the queue)."""
    return model_bound(model.spec) // (1 + QUEUED_PER_SLOT)


async def infer_batch(
    state: GatewayState, model: DifyModel, items: Sequence[InferenceRequest], rid: str
) -> BatchResponse:
    """Every item through `inference.infer`, together; results in the items' order."""
    state.model_replicas.require_serving(model.target)
    running = asyncio.Semaphore(slots(model))
    answers = await asyncio.gather(*(_answer(state, model, item, rid, running) for item in items))
    _unavailable_for_all(answers)
    results: list[BatchResult] = []
    for index, answer in enumerate(answers):
        if isinstance(answer, InferenceResponse):
            results.append(
                BatchItemOk(
                    index=index,
                    output=answer.output,
                    usage=answer.usage,
                    finish_reason=answer.finish_reason,
                )
            )
        else:
            error = BatchItemError(code=answer.code, message=answer.message)
            results.append(BatchItemFailed(index=index, error=error))
    usage = _total(answers)
    _note(model, items, usage, failed=sum(isinstance(a, DifyError) for a in answers))
    return BatchResponse(id=rid, model=model.target, results=results, usage=usage)


async def _answer(
    state: GatewayState,
    model: DifyModel,
    item: InferenceRequest,
    rid: str,
    running: asyncio.Semaphore,
) -> InferenceResponse | DifyError:
    """One item's answer, or the error it would get alone (never raised: it is its own)."""
    async with running:
        try:
            return await plane.infer(state, model, item, rid)
        except DifyError as exc:
            return exc
        except Exception:
            log.exception("batch %s: an item failed on model %s", rid, model.target)
            return ApiError(500, *INTERNAL)


def _unavailable_for_all(answers: Sequence[InferenceResponse | DifyError]) -> None:
    """Raise the first 503 when every item got one: the model, not the items, failed."""
    if answers and all(isinstance(a, DifyError) and a.status == 503 for a in answers):
        first = answers[0]
        assert isinstance(first, DifyError)
        raise first


def _total(answers: Sequence[InferenceResponse | DifyError]) -> Usage:
    done = [a.usage for a in answers if isinstance(a, InferenceResponse)]
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in done),
        completion_tokens=sum(u.completion_tokens for u in done),
        total_tokens=sum(u.total_tokens for u in done),
    )


def _note(model: DifyModel, items: Sequence[InferenceRequest], usage: Usage, failed: int) -> None:
    """The audit row's notes for the whole batch. Each item's call noted its own tokens
    and text over the last one's (one row per request), so the totals go in after."""
    note(detail=f"batch of {len(items)}, {failed} failed")
    task = model.spec.task
    if task == Task.TEXT_GENERATION:
        note(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
    elif task == Task.FEATURE_EXTRACTION:
        note(prompt_tokens=usage.prompt_tokens)
    else:
        return  # inputs of other tasks may be images: their text is not kept
    note_text(lambda: _texts(items))


def _texts(items: Sequence[InferenceRequest]) -> str:
    """The items' texts, one a line, up to what an audit row keeps."""
    texts: list[str] = []
    size = 0
    for item in items:
        given = item.input if item.input is not None else item.prompt
        for text in [given] if isinstance(given, str) else given or []:
            texts.append(text)
            size += len(text) + 1
            if size > TEXT_CHARS:
                return "\n".join(texts)
    return "\n".join(texts)
