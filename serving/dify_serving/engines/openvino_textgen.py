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

Scheduling: one pipeline per replica, in a process of its own (`openvino_worker`):
its `step()` holds the GIL while it computes, which froze the replica's event loop and
Ray's threads (64 concurrent HTTP clients kept ~20 sequences in the batch: 800 tok/s
against 1,450 in-process). The worker adds the requests that arrived, runs `step()` (one
iteration: new prompts are prefilled while the running sequences decode a token each,
`dynamic_split_fuse`), and sends every request's new token ids; a thread here hands them
to each caller's asyncio queue. Sampling (temperature, top_p, seed) is per request inside
the pipeline: a seeded request's tokens do not depend on its batch mates, so unlike
CTranslate2 nothing goes to torch. A caller that goes away cancels its request at the
next step. The KV cache is reserved at load with the torch engine's bound
(`textgen.kv_cache_tokens`), so a model's memory does not depend on the engine and
cannot grow with the load; when it is full the pipeline preempts sequences and resumes
them once blocks free up (OpenVINO GenAI's default, `cache_size` 0, grows the cache
with the load instead). The status's `kv_cache_usage` is the share of that bound in use.
A worker that dies fails the requests it held and every later one (503), and the
replica's health check fails, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dify_serving.engines import openvino_export, progress, weights
from dify_serving.engines.base import (
    ConversionFailed,
    inline_or_thread,
    rss_bytes,
    written_in_place,
)
from dify_serving.engines.protocol import EngineError, GenerationRequest
from dify_serving.engines.textgen import TokenGenerator, kv_cache_tokens
from dify_serving.specs import DifyModelSpec, Precision

log = logging.getLogger(__name__)

MODEL_FILE = "openvino_model.xml"
#: Prompt tokens one step prefills at most (with the decoding rows). 256 (the default)
#: decoded 2,010 tok/s of the 58 M shape at 64 sequences here, 1,024 2,164, 4,096 2,265.
MAX_BATCHED_TOKENS = 4096
#: Tokens per KV-cache block of OpenVINO GenAI on CPU (2026.4: a 40-token prompt took 2
#: of 10 blocks).
KV_BLOCK_TOKENS = 32
#: Seconds the worker may take to compile the model before the load fails.
START_TIMEOUT_S = 600.0


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
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    prompt_tokens: int
    streaming: bool
    cancelled: bool = False

    def send(self, item: tuple[list[int], str | None, str | EngineError | None]) -> None:
        """From the reader thread to the caller's loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            self.cancelled = True


def kv_cache_blocks(spec: DifyModelSpec, max_context: int) -> int:
    """The pipeline's KV cache in blocks: the torch engine's bound (`kv_cache_tokens`)."""
    tokens = kv_cache_tokens(spec.batching.max_concurrent_requests, max_context)
    return -(-tokens // KV_BLOCK_TOKENS)


class OpenVINOGenerationEngine(TokenGenerator):
    """An OpenVINO GenAI `ContinuousBatchingPipeline` on CPU; see the module docstring."""

    def __init__(
        self, name: str, spec: DifyModelSpec, path: str, *, home: Path | None = None
    ) -> None:
        super().__init__(name, spec, path, home=home)
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
        threads = torch.get_num_threads()
        if self.precision == Precision.BF16 and threads < 2:
            # OpenVINO 2026.4 dies of SIGFPE compiling this pipeline in bf16 on one
            # thread (an AMX Xeon here)
            self.precision = Precision.FP32
            self.runtime_note = (
                "bf16 on OpenVINO needs at least 2 threads (resources.cpus): running fp32"
            )
        kind = "bf16" if self.precision == Precision.BF16 else "f32"
        settings = {
            "folder": str(folder),
            "scheduler": {
                "dynamic_split_fuse": True,
                "max_num_seqs": max(1, spec.batching.max_concurrent_requests),
                "max_num_batched_tokens": MAX_BATCHED_TOKENS,
                "num_kv_blocks": kv_cache_blocks(spec, self.max_context),
                "cache_size": 0,  # sized by the blocks
            },
            "properties": {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": kind,
                # the CPU's default cache precision is lower (an f16 cache agreed with
                # fp32's greedy tokens on 58 of 64 sequences): fp32 must be exact
                "KV_CACHE_PRECISION": kind,
            },
        }
        progress.report(f"compiling the OpenVINO model ({kind})")
        self._start_worker(settings)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # sends to the worker, and the request table
        self._requests: dict[int, _Request] = {}
        self._load: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self._stopping: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"ov-{name}", daemon=True)
        self._reader.start()

    def _start_worker(self, settings: dict[str, Any]) -> None:
        """The worker process, its two pipes, and its word that the model compiled."""
        from multiprocessing.connection import Connection

        to_worker, from_worker = os.pipe(), os.pipe()
        env = {**os.environ, "DIFY_OV_WORKER": json.dumps(settings)}
        self._worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dify_serving.engines.openvino_worker",
                str(to_worker[0]),
                str(from_worker[1]),
            ],
            pass_fds=(to_worker[0], from_worker[1]),
            env=env,
        )
        os.close(to_worker[0])
        os.close(from_worker[1])
        self._outbox = Connection(to_worker[1], readable=False)
        self._inbox = Connection(from_worker[0], writable=False)
        if not self._inbox.poll(START_TIMEOUT_S):
            self._worker.kill()
            raise EngineError(503, "model_unavailable", "the OpenVINO worker did not start")
        try:
            kind, detail = self._inbox.recv()
        except EOFError:
            kind, detail = "failed", f"exit code {self._worker.wait()}"
        if kind != "ready":
            self._worker.wait()
            raise ConversionFailed(f"openvino could not compile the model ({detail})")

    def parameters(self) -> int:
        return self._parameters

    def info(self) -> dict[str, Any]:
        state = self.queue_state() or {}
        info = {
            **super().info(),
            "engine": "openvino",
            "active_requests": int(state.get("running", 0) + state.get("waiting", 0)),
        }
        if self._worker.poll() is None:  # the pipeline's memory is the worker's
            info["resident_memory_bytes"] += rss_bytes(self._worker.pid)
        return info

    def queue_state(self) -> dict[str, float] | None:
        running, waiting, usage = self._load
        with self._lock:
            outstanding = len(self._requests)
        # arrived, not yet in the worker's figures: waiting
        waiting = max(waiting, outstanding - running)
        return {"running": running, "waiting": waiting, "kv_cache_usage": usage}

    async def start(self) -> None:
        async for _ in self.generate_stream(GenerationRequest(prompt="warm up", max_tokens=4)):
            pass

    async def stop(self, reason: str) -> None:
        with self._lock:
            if self._stopping is None:
                self._stopping = reason
                self._send(("stop",))
        await asyncio.to_thread(self._reader.join, 30)
        await asyncio.to_thread(self._end_worker)

    def _end_worker(self) -> None:
        try:
            self._worker.wait(10)
        except subprocess.TimeoutExpired:
            self._worker.kill()
            self._worker.wait()
        self._outbox.close()

    def healthy(self) -> bool:
        """False once the worker process has exited without being stopped."""
        return self._stopping is not None or self._worker.poll() is None

    # requests --------------------------------------------------------------------------
    def _config(self, request: GenerationRequest, max_new: int) -> dict[str, Any]:
        temperature = float(request.temperature or 0.0)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        return {
            "max_new_tokens": max_new,
            "stop_token_ids": sorted(self.eos),
            "eos_token_id": min(self.eos) if self.eos else None,
            "temperature": temperature,
            "top_p": float(request.top_p or 1.0),
            "seed": int(seed) % (1 << 64),
        }

    def _send(self, message: tuple[Any, ...]) -> None:
        """To the worker (the caller holds `_lock`)."""
        try:
            self._outbox.send(message)
        except OSError:  # the worker is gone: the reader fails what it held
            log.warning("%s: the OpenVINO worker is gone", self.name)

    async def _tokens(
        self, request: GenerationRequest, streaming: bool
    ) -> AsyncIterator[tuple[Any, list[int], str | None]]:
        if self._stopping or not self.healthy():
            raise EngineError(503, "model_unavailable", f"{self.name} is not accepting requests")
        prompt_ids = await inline_or_thread(request.chars(), self.encode, request)
        max_new = self._budget(
            prompt_ids, int(request.max_tokens or self.spec.generation.max_new_tokens)
        )
        state = _Request(
            next(self._ids),
            asyncio.get_running_loop(),
            asyncio.Queue(),
            prompt_tokens=len(prompt_ids),
            streaming=streaming,
        )
        with self._lock:
            self._requests[state.id] = state
            self._send(("add", state.id, prompt_ids, self._config(request, max_new), streaming))
        finished = False
        try:
            async for item in self._received(state, state.queue):
                finished = item[2] is not None
                yield item
        finally:
            if not finished:  # the caller went away: its sequence ends at the next step
                with self._lock:
                    if self._requests.pop(state.id, None) is not None and not self._stopping:
                        self._send(("cancel", state.id))

    # the reader thread -----------------------------------------------------------------
    def _read(self) -> None:
        """The worker's messages, until it ends: tokens to their callers."""
        while True:
            try:
                message = self._inbox.recv()
            except (EOFError, OSError):
                break
            _, updates, load = message
            if load is not None:
                self._load = (float(load[0]), float(load[1]), float(load[2]))
            for request_id, new, status, reason in updates:
                self._deliver(request_id, new, status, reason)
        code = self._worker.wait()
        gone: str | EngineError | None = self._stopping
        if gone is None:  # retryable: another replica serves, or this one once replaced
            message = f"{self.name}: the OpenVINO worker exited (code {code})"
            log.error("%s", message)
            gone = EngineError(503, "model_unavailable", message)
        with self._lock:
            held, self._requests = list(self._requests.values()), {}
        for request in held:
            request.send(([], None, gone))
        self._inbox.close()

    def _deliver(self, request_id: int, new: list[int], status: str, reason: str | None) -> None:
        with self._lock:
            request = self._requests.get(request_id)
            if request is not None and status != "running":
                del self._requests[request_id]
        if request is None:  # cancelled meanwhile
            return
        if status == "running":
            request.send((new, None, None))
        elif status == "finished":
            request.send((new, self._finish_reason(reason, new), None))
        elif status == "ignored":  # more than the KV cache can ever hold
            request.send(([], None, "the request does not fit the KV cache"))
        elif status == "failed":
            request.send(([], None, reason or "generation failed"))
        else:  # cancelled or stopped: only this engine does either, for a caller gone
            request.send(([], None, "cancelled"))

    def _finish_reason(self, reason: str | None, new: list[int]) -> str:
        if reason in ("STOP", "LENGTH"):
            return reason.lower()
        return "stop" if new and new[-1] in self.eos else "length"
