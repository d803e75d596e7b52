"""Sentence embeddings: mean-pooled, L2-normalised, continuously batched.

Requests are tokenized once on arrival (that is where over-long inputs are refused),
then their token rows join one queue. The engine owns its batching, in and outside a
Serve replica alike: on CPU it runs one compute thread per pinned math thread, each
with a single torch thread, and whenever a compute thread is free it takes everything
queued (up to `max_batch_size` rows and a padded-token budget, shared fairly when
several threads are free). Rows that arrive while batches run form the next batch; a
small batch waits (batch_wait_timeout_ms) only while another batch is running, so an
idle engine answers at once. Independent single-threaded forwards beat one two-threaded forward
on small CPU batches (no barrier between OpenMP threads, so a core lent to the gateway
stalls one batch, not both) and need no batch window to stay busy. A batch is padded to
its longest member. Matches sentence-transformers' `encode` for mean-pooling models.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dify_serving.engines import runtimes
from dify_serving.engines.base import Engine, inline_or_thread
from dify_serving.engines.protocol import (
    Embeddings,
    EmbedRequest,
    EngineError,
    InputTooLong,
)
from dify_serving.specs import DifyModelSpec, Runtime, Task

log = logging.getLogger(__name__)


# Padded tokens (rows x longest row) one batch may hold, per row of max_batch_size:
# keeps one long text from padding a whole batch of short ones out to its length.
TOKENS_PER_ROW = 128
#: Rows and tokens waiting for a compute thread, at most. The gateway sends a model at
#: most a few thousand rows at a time (coalescer), an index 64-row slices; 32768 rows
#: of 64 tokens are about two minutes of work for MiniLM on two cores. Past either bound
#: a caller gets 503 (busy) at once instead of an ever longer queue.
MAX_QUEUED_ROWS = 32768
MAX_QUEUED_TOKENS = 2 * 1024 * 1024


class _Job:
    """One request's rows; its vectors fill `out` as the batches holding them finish."""

    __slots__ = ("arrived", "future", "next", "out", "pending", "rows", "tokens")

    def __init__(
        self, rows: list[list[int]], dimension: int, future: asyncio.Future[Any], now: float
    ) -> None:
        self.arrived = now
        self.rows = rows
        self.out = np.empty((len(rows), dimension), dtype=np.float32)
        self.pending = len(rows)
        self.future = future
        self.next = 0  # first row not yet handed to a batch
        self.tokens = 0  # counted against the queue's bound until the job leaves it


class EmbeddingEngine(Engine):
    task = Task.FEATURE_EXTRACTION

    def __init__(
        self, name: str, spec: DifyModelSpec, path: str, *, home: Path | None = None
    ) -> None:
        super().__init__(name, spec, path, home=home)
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.runtime = runtimes.resolve(spec)
        self.encoder: Any = None  # the OpenVINO encoder, when it runs the forward pass
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision)
        # OpenVINO converts fp32 weights; its precision is a compile-time hint
        dtype = torch.float32 if self.runtime == Runtime.OPENVINO else self.dtype
        self.model = AutoModel.from_pretrained(path, revision=spec.revision, dtype=dtype)
        self.model.to(self.device).eval()
        positions = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_tokens = int(min(self.tokenizer.model_max_length, positions))
        self.dimension = int(self.model.config.hidden_size)
        self._parameters = sum(p.numel() for p in self.model.parameters())
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.max_batch_size = spec.batching.max_batch_size
        self.token_budget = max(self.max_batch_size * TOKENS_PER_ROW, self.max_tokens)
        self.batch_wait_s = spec.batching.batch_wait_timeout_ms / 1000
        # CPU: one single-threaded forward per pinned thread; GPU: one stream of batches.
        threads = torch.get_num_threads()
        self.workers = threads if self.device == "cpu" else 1
        per_worker = 1 if self.workers > 1 else threads
        self._pool = ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix=f"embed-{name}",
            initializer=torch.set_num_threads,  # per thread: a new one starts at the default
            initargs=(per_worker,),
        )
        if self.runtime == Runtime.OPENVINO:
            self._open_openvino(threads)
        self._queue: deque[_Job] = deque()
        self._queued_rows = 0
        self._queued_tokens = 0
        self._busy = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._finished_at = 0.0  # loop time the last batch finished

    def _open_openvino(self, threads: int) -> None:
        from dify_serving.engines import openvino_encoder as openvino

        self.encoder = openvino.open_for(self, "encoder", self.workers, threads)
        if self.encoder is not None:
            self.model = None  # the IR serves; the torch weights are not needed again

    def parameters(self) -> int:
        return self._parameters

    async def start(self) -> None:
        await self.embed(["warm up the kernels"] * (2 * self.workers))

    def info(self) -> dict[str, Any]:
        info = {**super().info(), "dimension": self.dimension, "max_tokens": self.max_tokens}
        info["engine"] = str(self.runtime)
        if self.encoder is not None:
            info["precision"] = self.encoder.precision
        return info

    def tokenize(self, texts: list[str], truncate: bool, offset: int = 0) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        ids: list[list[int]]
        if backend is not None and backend.truncation is None and backend.padding is None:
            # The Rust tokenizer directly: what the wrapper does, at half the cost per call.
            ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
        else:
            ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for position, row in enumerate(ids):
            if len(row) > self.max_tokens:
                if not truncate:
                    raise InputTooLong(
                        f"input {offset + position} has {len(row)} tokens; {self.name} accepts at "
                        f"most {self.max_tokens}. Send truncate: true, or upsert the text "
                        "into an index, which chunks it."
                    )
                ids[position] = row[: self.max_tokens - 1] + row[-1:]
        return ids

    async def embed(self, texts: list[str], truncate: bool = False) -> Embeddings:
        ids = await inline_or_thread(sum(map(len, texts)), self.tokenize, texts, truncate)
        tokens = sum(map(len, ids))
        return Embeddings(await self._vectors(ids, tokens), tokens)

    async def embed_each(self, requests: list[EmbedRequest]) -> list[Embeddings | EngineError]:
        """Several requests' texts in one call (the gateway coalesces); an over-long input
        fails only its own request (positions in its message start at its `offset`)."""
        chars = sum(len(t) for request in requests for t in request.texts)
        spans, rows = await inline_or_thread(chars, self._tokenize_each, requests)
        tokens = sum(span[2] for span in spans if isinstance(span, tuple))
        vectors = await self._vectors(rows, tokens)
        return [
            Embeddings(vectors[span[0] : span[1]], span[2]) if isinstance(span, tuple) else span
            for span in spans
        ]

    def _tokenize_each(
        self, requests: list[EmbedRequest]
    ) -> tuple[list[tuple[int, int, int] | EngineError], list[list[int]]]:
        """Per request (first row, end row, tokens) or its error; all requests' rows."""
        spans: list[tuple[int, int, int] | EngineError] = []
        rows: list[list[int]] = []
        for request in requests:
            try:
                ids = self.tokenize(request.texts, request.truncate, request.offset)
            except InputTooLong as exc:
                spans.append(exc)
                continue
            spans.append((len(rows), len(rows) + len(ids), sum(map(len, ids))))
            rows += ids
        return spans, rows

    async def embed_tokens(self, rows: list[list[int]]) -> np.ndarray:
        """Vectors for token rows the caller cut (an index's chunker): no second tokenize."""
        for position, row in enumerate(rows):
            if len(row) > self.max_tokens:
                raise InputTooLong(
                    f"row {position} has {len(row)} tokens; {self.name} accepts at most "
                    f"{self.max_tokens}"
                )
        return await self._vectors(rows, sum(map(len, rows)))

    async def _vectors(self, rows: list[list[int]], tokens: int) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.dimension), np.float32)
        return await self.submit(rows, tokens)

    # ---- continuous batching ----------------------------------------------------------
    async def submit(self, rows: list[list[int]], tokens: int) -> np.ndarray:
        """Queue one request's rows (`tokens` in all); returns their vectors, one row each."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first call, or a new loop (asyncio.run per test)
            self._loop, self._queue, self._queued_rows, self._busy = loop, deque(), 0, 0
            self._queued_tokens = 0
            self._timer = None
        if (
            self._queued_rows + len(rows) > MAX_QUEUED_ROWS
            or self._queued_tokens + tokens > MAX_QUEUED_TOKENS
        ) and self._queued_rows:  # one request alone always gets in
            raise EngineError(
                503,
                "overloaded",
                f"{self.name} has {self._queued_rows} texts ({self._queued_tokens} tokens) "
                "waiting; retry shortly",
            )
        job = _Job(rows, self.dimension, loop.create_future(), loop.time())
        job.tokens = tokens
        self._queue.append(job)
        self._queued_rows += len(rows)
        self._queued_tokens += tokens
        self._dispatch()
        vectors: np.ndarray = await job.future
        return vectors

    def _dispatch(self) -> None:
        """Hand queued rows to every free compute thread."""
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queued_rows and self._busy < self.workers:
            free = self.workers - self._busy
            share = min(self.max_batch_size, -(-self._queued_rows // free))
            if self._busy and share < self.max_batch_size // self.workers:
                # Another batch is running, so this one is not urgent: a partial batch
                # waits (batch_wait_timeout_ms from its oldest row, or from the last
                # batch's end if later) for the rows that batch's callers send next.
                # Tiny batches cost several times more per row than batches of 8+.
                since = max(self._queue[0].arrived, self._finished_at)
                wait = since + self.batch_wait_s - self._loop.time()
                if wait > 0:
                    self._timer = self._loop.call_later(wait, self._dispatch)
                    return
            batch = self._take(share)
            rows = [row for job, start, end in batch for row in job.rows[start:end]]
            if not rows:  # only cancelled requests were queued
                continue
            self._busy += 1
            self.on_batch(len(rows))
            done = self._loop.run_in_executor(self._pool, self._forward, rows)
            done.add_done_callback(functools.partial(self._finish, batch))

    def queue_state(self) -> dict[str, float] | None:
        """Requests none of whose rows a batch has taken yet are waiting."""
        queued = list(self._queue)  # one C call: safe beside the loop's thread
        return {"waiting": sum(1 for job in queued if job.next == 0 and not job.future.done())}

    def _take(self, share: int) -> list[tuple[_Job, int, int]]:
        """Up to `share` rows from the head of the queue, within the padded-token budget."""
        batch: list[tuple[_Job, int, int]] = []
        count = width = 0
        while self._queue and count < share:
            job = self._queue[0]
            if job.future.done():  # cancelled while queued: drop its rows
                self._queued_rows -= len(job.rows) - job.next
                self._queued_tokens -= job.tokens
                self._queue.popleft()
                continue
            start = end = job.next
            while end < len(job.rows) and count < share:
                longest = max(width, len(job.rows[end]))
                if count and (count + 1) * longest > self.token_budget:
                    share = count  # full: stop here
                    break
                width, count, end = longest, count + 1, end + 1
            if end > start:
                batch.append((job, start, end))
                job.next = end
                self._queued_rows -= end - start
            if job.next == len(job.rows):
                self._queued_tokens -= job.tokens
                self._queue.popleft()
        return batch

    def _finish(self, batch: list[tuple[_Job, int, int]], done: asyncio.Future[np.ndarray]) -> None:
        self._busy -= 1
        assert self._loop is not None
        self._finished_at = self._loop.time()
        error = None if done.cancelled() else done.exception()
        matrix = done.result() if error is None and not done.cancelled() else None
        offset = 0
        for job, start, end in batch:
            if matrix is not None:
                job.out[start:end] = matrix[offset : offset + end - start]
            offset += end - start
            if job.future.done():  # the caller went away, or an earlier batch failed
                continue
            if matrix is None:
                job.future.set_exception(error or RuntimeError("embedding batch cancelled"))
                continue
            job.pending -= end - start
            if job.pending == 0:
                job.future.set_result(job.out)
        self._dispatch()

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        """One padded batch, on a compute thread."""
        torch = self._torch
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        if self.encoder is not None:
            hidden = self.encoder.forward(ids, mask)
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
            return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        with torch.inference_mode():
            input_ids = torch.from_numpy(ids).to(self.device)
            attention = torch.from_numpy(mask).to(self.device)
            out = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            weights = attention.unsqueeze(-1).to(out.dtype)
            pooled = (out * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled.cpu().numpy()
