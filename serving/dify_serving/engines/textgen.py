"""Text generation: what every generator shares, and transformers' continuous batching.

One warmed `ContinuousBatchingManager` per replica (a fresh one per call was 6× slower
here) runs iteration-level scheduling on its own thread. Each request registers a result
handler that feeds an asyncio queue on the replica's loop; outputs are cumulative, so the
engine turns them into token deltas and incremental text. Sampling is per request
(`sampling.PerRequestSampler`), so temperature, top_p and seed are honoured in a shared
batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dify_serving.engines import prompts, sampling
from dify_serving.engines.base import Engine, inline_or_thread
from dify_serving.engines.protocol import (
    EngineError,
    Generation,
    GenerationDelta,
    GenerationRequest,
)
from dify_serving.specs import DifyModelSpec, Task

log = logging.getLogger(__name__)


def eos_ids(tokenizer: Any, *sources: Any) -> set[int]:
    """Every end-of-sequence id the model's configs and tokenizer name."""
    ids: set[int] = set()
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None and i >= 0}


PAGE_SIZE = 64
#: Bounds of a replica's KV cache, in pages of PAGE_SIZE tokens (see `kv_cache_tokens`).
MIN_KV_PAGES, MAX_KV_PAGES = 64, 4096


def kv_cache_tokens(concurrent: int, max_context: int) -> int:
    """Tokens of KV cache a replica reserves: half of `concurrent` sequences of up to
    1,024 tokens (most requests stop well short of the context), in whole pages, between
    MIN_KV_PAGES and MAX_KV_PAGES pages, and never less than one sequence of the whole
    context: a request the context admits must fit alone (transformers' scheduler fails
    its loop on one that cannot, which stopped every later request too). The same bound
    for every engine that pages its cache, so a model's memory does not depend on which
    engine `auto` picked; an engine preempts (and later resumes) sequences rather than
    grow past it."""
    pages = -(-concurrent * min(max_context, 1024) // PAGE_SIZE) // 2
    pages = max(min(MAX_KV_PAGES, max(MIN_KV_PAGES, pages)), -(-max_context // PAGE_SIZE))
    return PAGE_SIZE * pages


@dataclass
class _Request:
    queue: asyncio.Queue[Any]
    eos: set[int]
    prompt_tokens: int
    sent: int = 0
    done: bool = False


class TokenGenerator(Engine):
    """What every generation engine shares: prompts and chats to token ids, the context
    budget, and token streams to text (whole or as deltas). An engine implements
    `_tokens`: submit one request, yield (state, new tokens, finish reason or None)."""

    task = Task.TEXT_GENERATION
    tokenizer: Any
    max_context: int
    eos: set[int]

    def _open_config(self) -> Any:
        """The model's config, with its tokenizer opened (for engines that read the
        weights themselves, not through a transformers model)."""
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(self.path, revision=self.spec.revision)
        try:
            generation_config = GenerationConfig.from_pretrained(
                self.path, revision=self.spec.revision or "main"
            )
        except OSError:  # no generation_config.json
            generation_config = None
        self._open_tokenizer(config, generation_config)
        return config

    def _open_tokenizer(self, config: Any, generation_config: Any = None) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path, revision=self.spec.revision)
        positions = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.max_context = min(self.spec.generation.max_context_tokens or positions, positions)
        self.eos = eos_ids(self.tokenizer, generation_config, config)

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "max_context_tokens": self.max_context,
            "max_new_tokens": self.spec.generation.max_new_tokens,
        }

    # requests --------------------------------------------------------------------------
    def encode(self, request: GenerationRequest) -> list[int]:
        return prompts.encode(self.tokenizer, request)

    def _budget(self, prompt_ids: list[int], max_tokens: int) -> int:
        return prompts.budget(self.name, self.max_context, len(prompt_ids), max_tokens)

    async def generate(self, request: GenerationRequest) -> Generation:
        """The whole answer: one output from the manager, decoded once."""
        tokens: list[int] = []
        prompt_tokens, finish = 0, None
        async for state, new_tokens, last in self._tokens(request, streaming=False):
            tokens.extend(new_tokens)
            prompt_tokens, finish = state.prompt_tokens, last
        text = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return Generation(text, finish, prompt_tokens, len(tokens))

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Yields deltas of text; the last one also has finish_reason and token counts."""
        text, tokens = "", list[int]()
        async for state, new_tokens, finish in self._tokens(request, streaming=True):
            tokens.extend(new_tokens)
            decoded = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
            delta, text = decoded[len(text) :], decoded
            if finish:
                yield GenerationDelta(delta, finish, state.prompt_tokens, len(tokens))
            elif delta:
                yield GenerationDelta(delta)

    def _tokens(
        self, request: GenerationRequest, streaming: bool
    ) -> AsyncIterator[tuple[Any, list[int], str | None]]:
        raise NotImplementedError

    async def _received(
        self, state: Any, queue: asyncio.Queue[Any]
    ) -> AsyncIterator[tuple[Any, list[int], str | None]]:
        """What an engine's worker put on a request's queue, as `_tokens` yields it:
        (new tokens, finish reason or None, error or None) until the finish; an error
        ends the request with a 503 naming it (an EngineError as it is)."""
        while True:
            new_tokens, finish, error = await queue.get()
            if isinstance(error, EngineError):
                raise error
            if error:
                raise EngineError(503, "generation_failed", f"{self.name}: {error}")
            yield state, new_tokens, finish
            if finish:
                return


class TextGenerationEngine(TokenGenerator):
    """transformers' continuous batching on torch (every device and precision)."""

    def __init__(
        self, name: str, spec: DifyModelSpec, path: str, *, home: Path | None = None
    ) -> None:
        super().__init__(name, spec, path, home=home)
        import torch
        from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, revision=spec.revision, dtype=self.dtype
        ).to(self.device)  # type: ignore[arg-type]
        self.model.eval()
        self._open_tokenizer(self.model.config, self.model.generation_config)
        concurrent = spec.batching.max_concurrent_requests
        blocks = kv_cache_tokens(concurrent, self.max_context) // PAGE_SIZE
        self.manager = self.model.init_continuous_batching(
            generation_config=GenerationConfig(
                do_sample=False,
                max_new_tokens=spec.generation.max_new_tokens,
                eos_token_id=sorted(self.eos)[0] if self.eos else -1,
                pad_token_id=self.tokenizer.pad_token_id or 0,
            ),
            continuous_batching_config=ContinuousBatchingConfig(
                num_blocks=blocks,
                page_size=PAGE_SIZE,
                max_batch_tokens=1024 if self.device == "cpu" else 8192,
                auto_switch_to_flash=False,
                allow_block_sharing=True,
            ),
        )
        sampling.install(self.manager, sampling.PerRequestSampler())
        self._requests: dict[str, _Request] = {}
        self._torch = torch

    # lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.manager.warmup()  # builds the cache here, so errors surface at load time
        self.manager.start()
        async for _ in self.generate_stream(GenerationRequest(prompt="warm up", max_tokens=4)):
            pass

    async def stop(self, reason: str) -> None:
        for request_id in list(self._requests):
            self._finish(request_id, error=reason)
        await asyncio.to_thread(self.manager.stop, block=True, timeout=5, hard_stop=True)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "active_requests": len(self._requests)}

    def healthy(self) -> bool:
        """False once the manager's generation thread has ended (an error in its loop):
        it accepts no request again, so the replica's health check fails and Serve
        replaces the replica."""
        return bool(self.manager.is_running())

    def queue_state(self) -> dict[str, float] | None:
        """The scheduler's active and waiting requests and the paged cache's use."""
        processor: Any = getattr(self.manager, "batch_processor", None)
        scheduler = getattr(processor, "scheduler", None)
        if scheduler is None:  # not started, or between runs
            return {"running": len(self._requests), "waiting": 0}
        state: dict[str, float] = {
            "running": len(scheduler.active_requests),
            "waiting": len(scheduler.waiting_requests),
        }
        with contextlib.suppress(Exception):  # transformers moved it: no figure, not a wrong one
            state["kv_cache_usage"] = 1.0 - float(processor.cache.compute_free_capacity())
        return state

    async def _tokens(
        self, request: GenerationRequest, streaming: bool
    ) -> AsyncIterator[tuple[_Request, list[int], str | None]]:
        """Submit one request; yield (state, new tokens, finish reason or None).

        Serve admits at most `max_concurrent_requests` calls per replica and the rest wait
        at the caller, which bounds them (gateway/inflight.py): the engine needs no bound.
        """
        prompt_ids = await inline_or_thread(request.chars(), self.encode, request)
        max_new = self._budget(
            prompt_ids, int(request.max_tokens or self.spec.generation.max_new_tokens)
        )
        seed = request.seed
        request_id = uuid.uuid4().hex
        state = _Request(asyncio.Queue(), self.eos, len(prompt_ids))
        self._requests[request_id] = state
        self.manager.register_result_handler(
            request_id, lambda out, rid=request_id: self._on_output(rid, out)
        )
        accepted = self.manager.add_request(
            prompt_ids,
            request_id=request_id,
            max_new_tokens=max_new,
            streaming=streaming,
            eos_token_id=sorted(self.eos) or -1,
            temperature=float(request.temperature or 0.0),
            top_p=float(request.top_p or 1.0),
            top_k=0,
            seed=int(seed if seed is not None else secrets.randbits(62)),
        )
        if accepted is None:
            self._forget(request_id)
            raise EngineError(503, "model_unavailable", f"{self.name} is not accepting requests")
        try:
            async for item in self._received(state, state.queue):
                yield item
        finally:
            if not state.done:  # the consumer went away: free the slot
                self.manager.cancel_request(request_id)
                self._forget(request_id)

    def _on_output(self, request_id: str, out: Any) -> None:
        """Runs on the event loop (transformers uses call_soon_threadsafe)."""
        from transformers.generation.continuous_batching import RequestStatus

        state = self._requests.get(request_id)
        if state is None or state.done:
            return
        new = out.generated_tokens[state.sent :]
        state.sent = len(out.generated_tokens)
        if out.status == RequestStatus.FAILED:
            self._finish(request_id, error=str(out.error))
        elif out.status == RequestStatus.FINISHED:
            last = out.generated_tokens[-1] if out.generated_tokens else None
            state.done = True
            self._requests.pop(request_id, None)
            state.queue.put_nowait((new, "stop" if last in state.eos else "length", None))
        else:
            state.queue.put_nowait((new, None, None))

    def _finish(self, request_id: str, error: str) -> None:
        state = self._requests.get(request_id)
        self._forget(request_id)
        if state is not None and not state.done:
            state.done = True
            state.queue.put_nowait(([], None, error))

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        router = self.manager.output_router
        with router._lock:  # a cancelled request never gets a final output
            router.result_handlers.pop(request_id, None)
