"""Text generation on OpenVINO GenAI's continuous-batching pipeline (paged attention).

On this CPU (AVX-512 with bf16) the pipeline decoded the 58 M Llama shape at 4.3× the
tokens per second of transformers' continuous batching in fp32, with the same greedy
tokens, and 6–7× in bf16; CTranslate2, the engine before it, reached 2.9–3.2×
(docs/probes/openvino-genai/REPORT.md, docs/benchmarks.md).

Conversion: the Hugging Face model becomes an OpenVINO IR with a stateful KV cache
(`openvino_export`, no optimum-intel: it pins transformers < 5.6) on the first load of a
(weights, revision, OpenVINO version, exporter version) into
`$DIFY_MIRROR_HOME/compiled/openvino-genai/<key>/`, via a scratch folder renamed into
place. The IR holds fp32 weights; bf16 is an inference hint, so one conversion serves
both precisions. The pipeline turns the IR's attention into paged attention itself.

Scheduling: one pipeline per replica and one thread that owns it. The thread adds the
requests that arrived, runs `step()` (one iteration: new prompts are prefilled while the
running sequences decode a token each, `dynamic_split_fuse`), and hands each request's new
token ids to its caller's asyncio queue. Sampling (temperature, top_p, seed) is per
request inside the pipeline: a seeded request's tokens do not depend on its batch mates,
so unlike CTranslate2 nothing goes to torch. A caller that goes away cancels its request
at the next step. The KV cache grows with use (`cache_size` 0) rather than reserving
gigabytes up front.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dify_serving.engines import openvino_export, progress, weights
from dify_serving.engines.base import ConversionFailed, inline_or_thread, written_in_place
from dify_serving.engines.protocol import EngineError, GenerationRequest
from dify_serving.engines.textgen import TokenGenerator
from dify_serving.specs import DifyModelSpec, Precision

log = logging.getLogger(__name__)

MODEL_FILE = "openvino_model.xml"
#: Prompt tokens one step prefills at most (with the decoding rows). 256 (the default)
#: decoded 2,010 tok/s of the 58 M shape at 64 sequences here, 1,024 2,164, 4,096 2,265.
MAX_BATCHED_TOKENS = 4096


def cache_dir(home: Path, weights: str, revision: str | None) -> Path:
    """The converted model's folder: keyed by weights, revision and both versions."""
    import openvino

    key = "|".join(
        (
            os.path.realpath(weights),
            revision or "",
            openvino.get_version(),
            str(openvino_export.EXPORT_VERSION),
        )
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return home / "compiled" / "openvino-genai" / digest


def convert(path: str, revision: str | None, folder: Path) -> None:
    """Export a Hugging Face causal LM; atomic (scratch folder renamed into place)."""
    with written_in_place(folder, MODEL_FILE) as scratch:
        openvino_export.export(path, scratch, revision=revision)


@dataclass(eq=False)
class _Request:
    id: int
    prompt_ids: list[int]
    config: Any  # openvino_genai.GenerationConfig
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    prompt_tokens: int
    streaming: bool
    handle: Any = None
    tokens: list[int] = field(default_factory=list)  # not streaming: sent at the end
    cancelled: bool = False
    done: bool = False

    def send(self, item: tuple[list[int], str | None, str | None]) -> None:
        """From the pipeline's thread to the caller's loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            self.cancelled = True


class OpenVINOGenerationEngine(TokenGenerator):
    """An OpenVINO GenAI `ContinuousBatchingPipeline` on CPU; see the module docstring."""

    def __init__(
        self, name: str, spec: DifyModelSpec, path: str, *, home: Path | None = None
    ) -> None:
        super().__init__(name, spec, path, home=home)
        import openvino_genai
        import torch

        self._open_config()
        folder = cache_dir(self.home, path, spec.revision)
        if not (folder / MODEL_FILE).is_file():
            progress.report(
                "converting to OpenVINO (first load of these weights; cached afterwards)"
            )
            try:
                convert(path, spec.revision, folder)
            except Exception as exc:  # the registry runs torch and says why
                log.warning("%s: OpenVINO conversion failed", name, exc_info=True)
                raise ConversionFailed(
                    f"openvino conversion failed ({type(exc).__name__})"
                ) from exc
        self._parameters = weights.count_parameters(path)
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.dynamic_split_fuse = True
        scheduler.max_num_seqs = max(1, spec.batching.max_concurrent_requests)
        scheduler.max_num_batched_tokens = MAX_BATCHED_TOKENS
        scheduler.cache_size = 0  # grows with use
        threads = torch.get_num_threads()
        if self.precision == Precision.BF16 and threads < 2:
            # OpenVINO 2026.4 dies of SIGFPE compiling this pipeline in bf16 on one
            # thread (an AMX Xeon here); a crashed replica serves nobody
            self.precision = Precision.FP32
            self.runtime_note = (
                "bf16 on OpenVINO needs at least 2 threads (resources.cpus): running fp32"
            )
        kind = "bf16" if self.precision == Precision.BF16 else "f32"
        properties = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": kind,
            # the IR asks for an f16 cache, which changes greedy tokens (58/64 agreed)
            "KV_CACHE_PRECISION": kind,
        }
        progress.report(f"compiling the OpenVINO model ({kind})")
        self._ov = openvino_genai
        self.pipeline = openvino_genai.ContinuousBatchingPipeline(
            str(folder), scheduler, "CPU", properties
        )
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._arrived: list[_Request] = []  # guarded by _lock; the thread adds them
        self._active: dict[int, _Request] = {}  # the thread's own
        self._stopping: str | None = None
        self._state: dict[str, float] = {"running": 0, "waiting": 0}
        self._thread = threading.Thread(target=self._run, name=f"ov-{name}", daemon=True)
        self._thread.start()

    def parameters(self) -> int:
        return self._parameters

    def info(self) -> dict[str, Any]:
        state = self.queue_state() or {}
        return {
            **super().info(),
            "engine": "openvino",
            "active_requests": int(state.get("running", 0) + state.get("waiting", 0)),
        }

    def queue_state(self) -> dict[str, float] | None:
        with self._lock:
            state = dict(self._state)
            state["waiting"] += sum(not r.cancelled for r in self._arrived)
        return state

    async def start(self) -> None:
        async for _ in self.generate_stream(GenerationRequest(prompt="warm up", max_tokens=4)):
            pass

    async def stop(self, reason: str) -> None:
        with self._lock:
            self._stopping = reason
            self._lock.notify()
        await asyncio.to_thread(self._thread.join, 30)

    # requests --------------------------------------------------------------------------
    def _config(self, request: GenerationRequest, max_new: int) -> Any:
        config = self._ov.GenerationConfig()
        config.max_new_tokens = max_new
        config.stop_token_ids = set(self.eos)
        if self.eos:
            config.eos_token_id = min(self.eos)
        temperature = float(request.temperature or 0.0)
        if temperature > 0:
            config.do_sample = True
            config.temperature = temperature
            config.top_p = float(request.top_p or 1.0)
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            config.rng_seed = int(seed) % (1 << 64)
        return config

    async def _tokens(
        self, request: GenerationRequest, streaming: bool
    ) -> AsyncIterator[tuple[Any, list[int], str | None]]:
        if self._stopping:
            raise EngineError(503, "model_unavailable", f"{self.name} is not accepting requests")
        prompt_ids = await inline_or_thread(request.chars(), self.encode, request)
        max_new = self._budget(
            prompt_ids, int(request.max_tokens or self.spec.generation.max_new_tokens)
        )
        state = _Request(
            next(self._ids),
            prompt_ids,
            self._config(request, max_new),
            asyncio.get_running_loop(),
            asyncio.Queue(),
            prompt_tokens=len(prompt_ids),
            streaming=streaming,
        )
        with self._lock:
            self._arrived.append(state)
            self._lock.notify()
        try:
            async for item in self._received(state, state.queue):
                yield item
        finally:
            state.cancelled = True  # a no-op once done; else its sequence ends at the next step

    # the pipeline's thread -------------------------------------------------------------
    def _run(self) -> None:
        busy = False  # the pipeline holds unfinished sequences (cancelled ones too)
        while True:
            with self._lock:
                while not (self._arrived or busy or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    break
                arrived, self._arrived = self._arrived, []
            try:
                self._add(arrived)
                self.pipeline.step()
                self._collect()
                busy = self.pipeline.has_non_finished_requests()
            except Exception as exc:  # the pipeline failed: every request in it ends
                log.exception("%s: a pipeline step failed", self.name)
                for request in self._active.values():
                    request.send(([], None, f"generation failed ({type(exc).__name__})"))
                self._active.clear()
                busy = False
            metrics = self.pipeline.get_metrics()
            running = min(len(self._active), int(metrics.scheduled_requests))
            with self._lock:
                self._state = {
                    "running": float(running),
                    "waiting": float(len(self._active) - running),
                    "kv_cache_usage": float(metrics.cache_usage) / 100.0,
                }
        reason = self._stopping
        with self._lock:
            arrived, self._arrived = self._arrived, []
        for request in [*arrived, *self._active.values()]:
            if request.handle is not None and not request.done:
                request.handle.cancel()
            request.send(([], None, reason))
        self._active.clear()
        try:  # one more step frees the cancelled sequences' blocks
            if self.pipeline.has_non_finished_requests():
                self.pipeline.step()
        except Exception:  # stopping anyway
            log.debug("%s: the last step failed", self.name, exc_info=True)

    def _add(self, arrived: list[_Request]) -> None:
        import numpy as np
        import openvino

        for request in arrived:
            if request.cancelled:
                continue
            ids = openvino.Tensor(np.asarray([request.prompt_ids], dtype=np.int64))
            request.handle = self.pipeline.add_request(request.id, ids, request.config)
            self._active[request.id] = request

    def _collect(self) -> None:
        """Each request's new tokens since the last step, and its end."""
        status = self._ov.GenerationStatus
        for request in list(self._active.values()):
            handle = request.handle
            if request.cancelled:
                handle.cancel()
                del self._active[request.id]
                continue
            new: list[int] = []
            reason = None
            if handle.can_read():
                for output in handle.read().values():
                    new.extend(int(i) for i in output.generated_ids)
                    reason = output.finish_reason
            current = handle.get_status()
            if not request.streaming:
                request.tokens.extend(new)
                new = request.tokens
            if current == status.RUNNING:
                if new and request.streaming:
                    request.send((new, None, None))
                continue
            del self._active[request.id]
            request.done = True
            if current == status.FINISHED:
                request.send((new, self._finish_reason(reason, new), None))
            elif current == status.IGNORED:  # more than the KV cache can ever hold
                request.send(([], None, "the request does not fit the KV cache"))
            else:  # CANCEL or STOP: only this engine does either, for a caller gone
                request.send(([], None, "cancelled"))

    def _finish_reason(self, reason: Any, new: list[int]) -> str:
        if reason == self._ov.GenerationFinishReason.STOP:
            return "stop"
        if reason == self._ov.GenerationFinishReason.LENGTH:
            return "length"
        return "stop" if new and new[-1] in self.eos else "length"
