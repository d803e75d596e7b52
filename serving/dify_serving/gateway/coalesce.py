"""Concurrent embedding requests to one model ride one replica call.

Each call through a Serve handle costs the gateway and the replica a fixed amount of CPU
(routing, serialization, a gRPC round trip), which at one short text per request was
most of the gateway's cost. Requests that arrive while calls are in flight wait and go
together in the next one (natural batching: no timer, so an idle gateway adds no
latency). Up to `EAGER_CALLS` calls start at once; beyond them a call starts only once
`START_ROWS` texts wait, else the waiting texts join the call that the next one to end
starts. So requests that arrive one at a time (gRPC's poller hands them over singly,
where uvicorn reads several in one turn of the loop) still share calls: Embed over gRPC
went from 0.79x to 0.93x of REST with REST unchanged (docs/benchmarks.md; gating every
call beyond the first cost REST 10%). At most `IN_FLIGHT` calls per model run at once,
enough to keep the engine's own continuous batching busy. Errors stay per request: the
engine tokenizes each one apart and answers an over-long input with its own error.

Every call stays small enough for the transport between deployments (Ray Serve's gRPC
refuses messages over `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`, 4 MiB by default; the
local stack raises it): a call carries at most `call_chars` characters of text (at most
half the limit in UTF-8) and as many rows as `reply_bytes` (half the limit) of vectors
hold, the vector size learned from the first reply, so a large request is cut into
several calls and put back together. What waits is bounded too: over `MAX_PENDING_ROWS`
texts queued for one model the gateway answers 503 with Retry-After instead of holding
ever more requests.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import numpy as np

from dify_serving.engines.protocol import Embeddings, EmbedRequest
from dify_serving.errors import DifyError
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.limits import GRPC_DEFAULT_BYTES, replica_message_bytes

IN_FLIGHT = 4
#: Calls that start at once, whatever waits.
EAGER_CALLS = 2
#: Texts that must wait before a call starts beside `EAGER_CALLS` running ones.
START_ROWS = 8
MAX_REQUESTS = 16
#: Rows per call at most, whatever the vector size (the engine batches 32 at a time).
MAX_CALL_ROWS = 1024
#: Texts waiting per model: four of the largest requests (2048 texts) behind the calls
#: in flight, a few seconds of work for a small model on a few cores. Past that a
#: client is better told to retry (or sent to another replica) than made to wait.
MAX_PENDING_ROWS = 8192


class _Part:
    """Texts of one request (or one slice of it) and the future its result goes to."""

    __slots__ = ("chars", "future", "offset", "texts", "truncate")

    def __init__(
        self, texts: list[str], truncate: bool, offset: int, chars: int, future: Any
    ) -> None:
        self.texts, self.truncate, self.offset, self.chars = texts, truncate, offset, chars
        self.future: asyncio.Future[Embeddings] = future


def call_budgets() -> tuple[int, int]:
    """(bytes of vectors per reply, characters of text per call) for this process's
    transport: half its message limit each (a character is at most 4 bytes in UTF-8)."""
    limit = replica_message_bytes() or GRPC_DEFAULT_BYTES
    return limit // 2, limit // 8


class EmbedCoalescer:
    def __init__(self, call: Any, name: str = "") -> None:
        self._call = call  # async (list[EmbedRequest]) -> list[Embeddings | EngineError]
        self._name = name
        self.reply_bytes, self.call_chars = call_budgets()  # per model, once per process
        self._pending: deque[_Part] = deque()
        self._pending_rows = 0
        self._running = 0
        self._drainers: set[asyncio.Task[None]] = set()
        self.row_bytes = 4 * 4096  # float32 rows of the largest common size, until known

    @property
    def max_rows(self) -> int:
        return max(1, min(MAX_CALL_ROWS, self.reply_bytes // self.row_bytes))

    async def embed(self, texts: list[str], truncate: bool) -> Embeddings:
        if self._pending_rows + len(texts) > MAX_PENDING_ROWS:
            raise ApiError(
                503,
                "overloaded",
                f"model {self._name!r} has {self._pending_rows} texts waiting to be embedded "
                f"(at most {MAX_PENDING_ROWS}); retry shortly",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        parts = [_Part(t, truncate, o, c, loop.create_future()) for t, o, c in self._slices(texts)]
        self._pending.extend(parts)
        self._pending_rows += len(texts)
        for _ in parts:
            if self._running >= IN_FLIGHT or (
                self._running >= EAGER_CALLS and self._pending_rows < START_ROWS
            ):
                break
            self._running += 1
            task = loop.create_task(self._drain())
            self._drainers.add(task)  # held: the loop keeps only weak references
            task.add_done_callback(self._drainers.discard)
        if len(parts) == 1:
            return await parts[0].future
        results = await asyncio.gather(*(p.future for p in parts), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        done: list[Embeddings] = results  # type: ignore[assignment]
        return Embeddings(
            np.concatenate([r.vectors for r in done]), sum(r.prompt_tokens for r in done)
        )

    def _slices(self, texts: list[str]) -> list[tuple[list[str], int, int]]:
        """(texts, offset, characters) per call: within the row and character budgets."""
        rows = self.max_rows
        chars = sum(map(len, texts))
        if len(texts) <= rows and chars <= self.call_chars:
            return [(texts, 0, chars)]
        out, start, size = [], 0, 0
        for end, text in enumerate(texts):
            if end > start and (end - start >= rows or size + len(text) > self.call_chars):
                out.append((texts[start:end], start, size))
                start, size = end, 0
            size += len(text)
        out.append((texts[start:], start, size))
        return out

    def _take(self) -> list[_Part]:
        batch: list[_Part] = []
        rows = chars = 0
        while self._pending and len(batch) < MAX_REQUESTS:
            part = self._pending[0]
            if batch and (
                rows + len(part.texts) > self.max_rows or chars + part.chars > self.call_chars
            ):
                break
            self._pending.popleft()
            self._pending_rows -= len(part.texts)
            if part.future.done():  # its client went away
                continue
            batch.append(part)
            rows += len(part.texts)
            chars += part.chars
        return batch

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._take()
                if not batch:
                    continue
                try:
                    results = await self._call(
                        [EmbedRequest(p.texts, p.truncate, p.offset) for p in batch]
                    )
                except BaseException as exc:
                    for part in batch:
                        if not part.future.done():
                            part.future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for part, result in zip(batch, results, strict=True):
                    if part.future.done():
                        continue
                    if isinstance(result, DifyError):
                        part.future.set_exception(result)
                    else:
                        part.future.set_result(result)
                        vectors = result.vectors
                        if len(vectors):
                            self.row_bytes = vectors.shape[1] * vectors.itemsize
        finally:
            self._running -= 1
