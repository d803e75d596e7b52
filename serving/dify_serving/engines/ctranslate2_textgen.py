"""Text generation on CTranslate2: converted once, cached, batched per request wave.

On CPU, CTranslate2's fp32 kernels decode a small Llama 2.6× (AVX2) to 3.1× (AVX-512)
faster than transformers' continuous batching, with token-identical greedy output
(docs/benchmarks.md).
The Hugging Face model is converted (`TransformersConverter`) on the first load of a
(weights, revision, CTranslate2 version, compute type) into
`$DIFY_MIRROR_HOME/compiled/ctranslate2/<key>/`, via a scratch folder renamed into place.

Batching: CTranslate2 batches what it is given together and cannot add a sequence to a
running batch, so requests queue and a free worker (`inter_threads`, one math thread
each: two single-threaded batches decoded 1.6× the tokens of one two-threaded batch here)
takes its share of them as one batch (`_dispatch`); requests that arrive while batches
run form the next ones. A per-token callback streams tokens, stops each row at its own
`max_tokens`, and stops a row whose caller went away (cancellation).

Sampling: temperature and top_p run inside CTranslate2. Its random generator is seeded
once per worker thread, so a *seed* cannot be honoured per request: a sampled request
with a seed runs on transformers' engine (`TextGenerationEngine`, built on first need),
which draws each request's tokens from its own seed, as every engine here promises.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dify_serving.engines import progress, weights
from dify_serving.engines.base import ConversionFailed, inline_or_thread, written_in_place
from dify_serving.engines.protocol import EngineError, GenerationRequest
from dify_serving.engines.textgen import TextGenerationEngine, TokenGenerator
from dify_serving.specs import DifyModelSpec, Precision

log = logging.getLogger(__name__)

MODEL_FILE = "model.bin"
#: Sequences one batch holds at most; more queued requests wait for the next batch.
MAX_BATCH = 128
#: int8 serves only where its greedy tokens agree with fp32's this often on PROBE.
INT8_AGREEMENT = 0.98
PROBE_TOKENS = 32
PROBE = (
    "The capital of France is",
    "To make a cup of tea, first",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of motion are",
    "Kubernetes schedules pods onto nodes by",
    "Dear customer, thank you for your order. Your refund",
    "In 1969, the first humans",
    "The recipe calls for two cups of flour and",
    "Photosynthesis converts light into",
    "A good password should",
    "The quarterly report shows that revenue",
    "SELECT name, email FROM users WHERE",
    "Water boils at 100 degrees Celsius because",
    "The meeting was moved to Thursday since",
    "Translate to German: Good morning, how are you?",
)


def cache_dir(home: Path, weights: str, revision: str | None, compute_type: str) -> Path:
    """The converted model's folder: keyed by weights, revision, version and compute type."""
    import ctranslate2

    key = f"{os.path.realpath(weights)}|{revision or ''}|{ctranslate2.__version__}|{compute_type}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return home / "compiled" / "ctranslate2" / digest


def convert(path: str, revision: str | None, tokenizer: Any, config: Any, folder: Path) -> None:
    """Convert a Hugging Face causal LM; atomic (scratch folder renamed into place)."""
    from ctranslate2.converters import TransformersConverter

    with written_in_place(folder, MODEL_FILE) as scratch:
        TransformersConverter(path, revision=revision).convert(
            str(scratch), quantization="float32", force=True
        )
        _name_special_tokens(scratch / "config.json", tokenizer, config)


def _name_special_tokens(config_file: Path, tokenizer: Any, config: Any) -> None:
    """The converter takes bos/eos from the tokenizer; a tokenizer that names none (a
    BERT vocabulary under a Llama, like demo-llm) gets the model config's ids instead,
    else CTranslate2 refuses to load the model."""
    data = json.loads(config_file.read_text())
    for key in ("bos_token", "eos_token"):
        token_id = getattr(config, f"{key}_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if data.get(key) is None and token_id is not None:
            data[key] = tokenizer.convert_ids_to_tokens(int(token_id))
    config_file.write_text(json.dumps(data, indent=2))


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    streaming: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    prompt_tokens: int = 0
    arrived: float = 0.0  # loop time
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False

    @property
    def sampling(self) -> tuple[float, float]:
        return (self.temperature, self.top_p if self.temperature > 0 else 1.0)


class CTranslate2Engine(TokenGenerator):
    """A CTranslate2 `Generator` on CPU; see the module docstring."""

    def __init__(
        self, name: str, spec: DifyModelSpec, path: str, *, home: Path | None = None
    ) -> None:
        super().__init__(name, spec, path, home=home)
        import ctranslate2
        import torch

        config = self._open_config()
        folder = cache_dir(self.home, path, spec.revision, "float32")
        if not (folder / MODEL_FILE).is_file():
            progress.report(
                "converting to CTranslate2 (first load of these weights; cached afterwards)"
            )
            try:
                convert(path, spec.revision, self.tokenizer, config, folder)
            except Exception as exc:  # the registry runs torch and says why
                raise ConversionFailed(
                    f"ctranslate2 conversion failed ({type(exc).__name__})"
                ) from exc
        self._parameters = weights.count_parameters(path)
        threads = torch.get_num_threads()
        # Two workers of one thread each: CTranslate2's threads inside one small batch
        # scale poorly, and a wave that arrives while one batch decodes starts at once.
        self.workers = 2 if threads >= 2 else 1

        def open_generator(compute_type: str) -> Any:
            return ctranslate2.Generator(
                str(folder),
                device="cpu",
                compute_type=compute_type,
                inter_threads=self.workers,
                intra_threads=max(1, threads // self.workers),
            )

        self.generator = open_generator("float32")
        self.int8_agreement: float | None = None
        if self.precision == Precision.INT8:  # quantized at load from the fp32 model
            progress.report("checking int8 against fp32 on the probe prompts")
            int8 = open_generator("int8_float32")
            self.int8_agreement = self._agreement(int8)
            if self.int8_agreement >= INT8_AGREEMENT:
                self.generator = int8
            else:
                self.precision = Precision.FP32
                self.runtime_note = (
                    f"int8 agreed with fp32 on {self.int8_agreement:.2f} of the probe's greedy "
                    f"tokens (< {INT8_AGREEMENT}): running fp32"
                )
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"ct2-{name}")
        self._queue: deque[_Request] = deque()
        self._busy = 0
        self._running: list[list[_Request]] = []  # the batches the workers decode
        self._timer: asyncio.TimerHandle | None = None
        self.batch_wait_s = spec.batching.batch_wait_timeout_ms / 1000
        self._stopping: str | None = None
        self._seeded: TextGenerationEngine | None = None
        self._seeded_lock = asyncio.Lock()

    def _agreement(self, int8: Any) -> float:
        """Share of greedy tokens int8 gives as fp32 does, position by position, over
        PROBE (after a first difference the texts part ways, so this is strict)."""
        prompts = [
            self.tokenizer.convert_ids_to_tokens(self.encode(GenerationRequest(prompt=p)))
            for p in PROBE
        ]
        options = {"max_length": PROBE_TOKENS, "include_prompt_in_result": False}
        reference = self.generator.generate_batch(prompts, **options)
        quantized = int8.generate_batch(prompts, **options)
        same = total = 0
        for a, b in zip(reference, quantized, strict=True):
            ours, theirs = a.sequences_ids[0], b.sequences_ids[0]
            total += max(len(ours), len(theirs))
            same += sum(x == y for x, y in zip(ours, theirs, strict=False))
        return same / max(total, 1)

    def parameters(self) -> int:
        return self._parameters

    def info(self) -> dict[str, Any]:
        info = {**super().info(), "engine": "ctranslate2"}
        if self.int8_agreement is not None:
            info["int8_agreement"] = round(self.int8_agreement, 4)
        info["active_requests"] = sum(map(len, self._running)) + len(self._queue)
        info["workers"] = self.workers
        if self._seeded is not None:
            notes = [info.get("engine_note"), "seeded sampling runs on torch (loaded on first use)"]
            info["engine_note"] = "; ".join(n for n in notes if n)
        return info

    async def start(self) -> None:
        async for _ in self.generate_stream(GenerationRequest(prompt="warm up", max_tokens=4)):
            pass

    def queue_state(self) -> dict[str, float] | None:
        running: float = sum(map(len, list(self._running)))
        waiting: float = len(self._queue)
        if self._seeded is not None:
            seeded = self._seeded.queue_state() or {}
            running += seeded.get("running", 0)
            waiting += seeded.get("waiting", 0)
        return {"running": running, "waiting": waiting}

    async def stop(self, reason: str) -> None:
        self._stopping = reason
        if self._timer is not None:
            self._timer.cancel()
        while self._queue:
            self._fail(self._queue.popleft(), reason)
        for batch in self._running:
            for request in batch:
                request.cancelled = True  # the callback ends its row at the next token
                self._fail(request, reason)
        if self._seeded is not None:
            await self._seeded.stop(reason)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # requests --------------------------------------------------------------------------
    async def _tokens(
        self, request: GenerationRequest, streaming: bool
    ) -> AsyncIterator[tuple[Any, list[int], str | None]]:
        if request.seed is not None and (request.temperature or 0.0) > 0:
            seeded = await self._seeded_engine()
            async for item in seeded._tokens(request, streaming):
                yield item
            return
        if self._stopping:
            raise EngineError(503, "model_unavailable", f"{self.name} is not accepting requests")
        prompt_ids = await inline_or_thread(request.chars(), self.encode, request)
        max_new = self._budget(
            prompt_ids, int(request.max_tokens or self.spec.generation.max_new_tokens)
        )
        loop = asyncio.get_running_loop()
        state = _Request(
            prompt_ids,
            max_new,
            float(request.temperature or 0.0),
            float(request.top_p or 1.0),
            streaming,
            loop,
            asyncio.Queue(),
            prompt_tokens=len(prompt_ids),
            arrived=loop.time(),
        )
        self._queue.append(state)
        self._dispatch()
        finished = False
        try:
            async for item in self._received(state, state.queue):
                finished = item[2] is not None
                yield item
        finally:
            if not finished:  # the consumer went away: its row stops at the next token
                state.cancelled = True

    async def _seeded_engine(self) -> TextGenerationEngine:
        async with self._seeded_lock:
            if self._seeded is None:
                log.info("%s: a seeded sampling request: loading the torch engine", self.name)
                engine = await asyncio.to_thread(
                    TextGenerationEngine, self.name, self.spec, self.path, home=self.home
                )
                await engine.start()
                self._seeded = engine
        return self._seeded

    # batching --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Give free workers queued requests, balancing rows between the workers.

        An idle engine starts a request at once (time to first token). While another
        batch runs, the queue waits `batch_wait_timeout_ms` from its oldest request for
        the rest of a wave (callers whose answers just ended send their next request
        together), then a free worker takes its share: the rows running and queued,
        split evenly over the workers. A batch cannot grow once started, so one worker
        left with most of the rows would decode them on one core while the other idles.
        (Waiting for a quiet gap of up to 25 ms instead measured the same over HTTP:
        557 against 544 tok/s, one model on the stack.)
        """
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._busy < self.workers:
            self._queue = deque(r for r in self._queue if not r.cancelled)
            if not self._queue:
                return
            if self._busy:
                wait = self._queue[0].arrived + self.batch_wait_s - loop.time()
                if wait > 0:
                    self._timer = loop.call_later(wait, self._dispatch)
                    return
            rows = len(self._queue) + sum(len(b) for b in self._running)
            share = min(MAX_BATCH, max(1, -(-rows // self.workers)))
            head = self._queue[0].sampling
            batch = [r for r in self._queue if r.sampling == head][:share]
            taken = set(batch)
            self._queue = deque(r for r in self._queue if r not in taken)
            self._busy += 1
            self._running.append(batch)
            self.on_batch(len(batch))
            done = loop.run_in_executor(self._pool, self._decode, batch)
            done.add_done_callback(functools.partial(self._finish, batch))

    def _decode(self, batch: list[_Request]) -> list[list[int]]:
        """One batch on a worker thread; tokens reach streaming callers as they come."""
        temperature, top_p = batch[0].sampling

        def on_token(step: Any) -> bool:
            request = batch[step.batch_id]
            if request.cancelled:
                return True
            request.tokens.append(step.token_id)
            if request.streaming:
                request.loop.call_soon_threadsafe(
                    request.queue.put_nowait, ([step.token_id], None, None)
                )
            return len(request.tokens) >= request.max_new

        results = self.generator.generate_batch(
            [self.tokenizer.convert_ids_to_tokens(r.prompt_ids) for r in batch],
            max_length=max(r.max_new for r in batch),
            include_prompt_in_result=False,
            end_token=sorted(self.eos) or None,
            return_end_token=True,
            sampling_topk=0 if temperature > 0 else 1,
            sampling_topp=top_p,
            sampling_temperature=temperature if temperature > 0 else 1.0,
            callback=on_token,
        )
        return [list(result.sequences_ids[0]) for result in results]

    def _finish(self, batch: list[_Request], done: asyncio.Future[list[list[int]]]) -> None:
        """On the loop: each request's last message (finish reason and any tokens not
        streamed), or the batch's error."""
        self._busy -= 1
        self._running.remove(batch)
        error = None if done.cancelled() else done.exception()
        for i, request in enumerate(batch):
            if request.cancelled:
                continue
            if error is not None or done.cancelled():
                log.warning("%s: batch failed: %s", self.name, error)
                self._fail(request, self._stopping or "generation failed")
                continue
            tokens = done.result()[i][: request.max_new]
            finish = "stop" if tokens and tokens[-1] in self.eos else "length"
            unsent = [] if request.streaming else tokens
            request.queue.put_nowait((unsent, finish, None))
        if not self._stopping:
            self._dispatch()

    @staticmethod
    def _fail(request: _Request, reason: str) -> None:
        request.queue.put_nowait(([], None, reason))
