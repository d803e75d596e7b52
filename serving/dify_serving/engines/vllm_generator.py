"""Text generation on vLLM: the engine Ray Serve LLM and KServe's huggingface server run.

On CUDA, vLLM's paged attention and CUDA graphs serve many concurrent streams far faster
than transformers' continuous batching (`textgen.py`); it is an extra (`vllm`) because it
brings its own CUDA build of torch, and it never runs on CPU here.

The spec becomes `AsyncEngineArgs` in one pure function, `engine_args`, and a request
becomes `SamplingParams` in another, `sampling_kwargs`: both import nothing from vLLM, so
the mapping is unit-tested on machines without it, against the field names of the pinned
release (tests/unit/test_vllm_generator.py). vLLM itself is imported only when a model
loads.

Prompts are tokenized here, with the model's tokenizer and chat template, exactly as
textgen does: both engines give the model the same token ids for the same request, and the
context check (`InputTooLong`) is the same. vLLM gets token ids, never text, and streams
deltas (`RequestOutputKind.DELTA`) detokenized by its own incremental detokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from dify_serving.engines import prompts
from dify_serving.engines.base import Engine, inline_or_thread
from dify_serving.engines.protocol import (
    EngineError,
    Generation,
    GenerationDelta,
    GenerationRequest,
)
from dify_serving.specs import DifyModelSpec, Precision, Task

#: vLLM's `dtype` for each spec precision.
DTYPES = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16"}
#: Share of a whole GPU's memory vLLM takes for weights, activations and KV cache (vLLM's
#: own default is 0.92): the rest is for the replica's process and CUDA's context.
GPU_MEMORY_UTILIZATION = 0.9
#: vLLM's finish reasons the protocol reports as they are; "abort" and "error" are errors.
_FINISHED = {"stop": "stop", "length": "length", "repetition": "stop"}
_CUDA_INDEX = re.compile(r"^cuda:([0-9]+)$")


def check_device(spec: DifyModelSpec) -> None:
    """Refuse a spec vLLM cannot serve here (CPU) before anything is loaded."""
    if not spec.uses_cuda:
        raise EngineError(
            422,
            "unsupported_device",
            f"engine vllm serves device cuda or cuda:N, not {spec.device}; use engine auto "
            "or torch on cpu",
        )


def tensor_parallel_size(spec: DifyModelSpec) -> int:
    """GPUs one replica shards the model over: `resources.gpus` when two or more."""
    gpus = spec.resources.gpus
    return int(gpus) if gpus >= 2 else 1


def engine_args(
    spec: DifyModelSpec, path: str, *, model_positions: int | None = None
) -> dict[str, Any]:
    """Keyword arguments for vLLM's `AsyncEngineArgs` serving `spec` from `path`.

    - `max_model_len` is `generation.maxContextTokens`, capped at `model_positions` (the
      model's `max_position_embeddings`, when known) as textgen caps it; unset, vLLM takes
      the model's own limit.
    - `max_num_seqs` is `batching.maxConcurrentRequests`: Serve admits that many requests
      per replica, and vLLM schedules them all at once.
    - `resources.gpus` of two or more shards the model (`tensor_parallel_size`) over worker
      processes of this replica (`mp`): the replica holds those GPUs (render.py asks Ray for
      them), and Ray's executor would place workers elsewhere and ignore `device_ids`.
    - A fraction of a GPU (`resources.gpus` < 1: replicas share it) takes that fraction of
      its memory, so vLLM's KV cache does not claim the memory of the neighbours.
    - `cuda:N` is honoured with vLLM's `device_ids` (`[N, …, N+tp-1]`), which vLLM reads as
      indices into the GPUs `CUDA_VISIBLE_DEVICES` shows the process (Ray sets it to the
      replica's GPUs): the same meaning `cuda:N` has for torch, and no environment to
      change in a process where CUDA may already be initialised. `cuda` alone: vLLM's
      default, the first visible GPUs.
    """
    check_device(spec)
    tp = tensor_parallel_size(spec)
    gpus = spec.resources.gpus
    share = gpus if 0 < gpus < 1 else 1.0
    args: dict[str, Any] = {
        "model": path,
        "tokenizer": path,
        "revision": spec.revision,
        "tokenizer_revision": spec.revision,
        "dtype": DTYPES[Precision(spec.precision)],
        "max_num_seqs": spec.batching.max_concurrent_requests,
        "tensor_parallel_size": tp,
        "gpu_memory_utilization": round(GPU_MEMORY_UTILIZATION * share, 4),
        "seed": 0,  # the engine's generator; a request's own seed goes to SamplingParams
        "trust_remote_code": False,
        "disable_log_stats": True,
        "enable_log_requests": False,
    }
    context = spec.generation.max_context_tokens
    if context is not None:
        args["max_model_len"] = min(context, model_positions) if model_positions else context
    if tp > 1:
        args["distributed_executor_backend"] = "mp"
    index = _CUDA_INDEX.match(spec.device)
    if index is not None:
        first = int(index.group(1))
        args["device_ids"] = list(range(first, first + tp))
    return args


def sampling_kwargs(request: GenerationRequest, max_new: int) -> dict[str, Any]:
    """Keyword arguments for vLLM's `SamplingParams`, as textgen samples.

    Temperature 0 (or none) is greedy: top_p and seed would change nothing and are left
    out. A sampled request without a seed draws from the engine's generator. Stop tokens
    are vLLM's own: the tokenizer's EOS and every `eos_token_id` of the generation config
    (itself read from config.json when the model has none), textgen's set.
    """
    kwargs: dict[str, Any] = {"max_tokens": max_new, "temperature": 0.0}
    temperature = float(request.temperature or 0.0)
    if temperature > 0.0:
        kwargs["temperature"] = temperature
        kwargs["top_p"] = float(request.top_p or 1.0)
        if request.seed is not None:
            kwargs["seed"] = int(request.seed)
    return kwargs


def finish_reason(reason: str | None) -> str | None:
    """The protocol's finish reason for vLLM's ("abort" and "error" raise instead)."""
    return None if reason is None else _FINISHED.get(reason, "stop")


def model_positions(path: str) -> int | None:
    """`max_position_embeddings` from a local model's config.json (None: not known here)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


class VllmGenerationEngine(Engine):
    """A `Generator` on vLLM's `AsyncLLM` (v1), one per replica."""

    task = Task.TEXT_GENERATION

    def __init__(
        self, name: str, spec: DifyModelSpec, path: str, *, home: Path | None = None
    ) -> None:
        check_device(spec)  # before the torch checks: the refusal should name vLLM
        super().__init__(name, spec, path, home=home)
        import vllm
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision)
        args = engine_args(spec, path, model_positions=model_positions(path))
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self.max_context = int(self.llm.model_config.max_model_len)
        self.tensor_parallel_size = int(args["tensor_parallel_size"])
        self.version = str(getattr(vllm, "__version__", "unknown"))
        self._active: set[str] = set()
        self._stopping: str | None = None

    # lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        async for _ in self.generate_stream(GenerationRequest(prompt="warm up", max_tokens=4)):
            pass

    async def stop(self, reason: str) -> None:
        """Abort what is in flight (each caller gets `reason`), then end vLLM's processes."""
        self._stopping = reason
        if self._active:
            await self.llm.abort(list(self._active))
        await asyncio.to_thread(self.llm.shutdown)

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "engine": "vllm",
            "engine_version": self.version,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_context_tokens": self.max_context,
            "max_new_tokens": self.spec.generation.max_new_tokens,
            "active_requests": len(self._active),
        }

    # requests --------------------------------------------------------------------------
    def _budget(self, prompt_tokens: int, max_tokens: int) -> int:
        return prompts.budget(self.name, self.max_context, prompt_tokens, max_tokens)

    async def generate(self, request: GenerationRequest) -> Generation:
        """The whole answer: vLLM's one final output."""
        text, last = "", GenerationDelta("")
        async with contextlib.aclosing(self._deltas(request, streaming=False)) as deltas:
            async for last in deltas:
                text += last.delta
        return Generation(text, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Yields deltas of text; the last one also has finish_reason and token counts."""
        async with contextlib.aclosing(self._deltas(request, streaming=True)) as deltas:
            async for delta in deltas:
                if delta.delta or delta.finish_reason:
                    yield delta

    async def _deltas(
        self, request: GenerationRequest, streaming: bool
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Submit one request; yield its outputs, the last with the finish reason and counts.

        Serve admits at most `max_concurrent_requests` calls per replica (`max_num_seqs`
        is the same number), so vLLM's own queue stays short. A consumer that goes away
        (a client disconnects, Serve cancels the call) aborts the request in vLLM at once.
        """
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        prompt_ids = await inline_or_thread(
            request.chars(), prompts.encode, self.tokenizer, request
        )
        max_new = self._budget(
            len(prompt_ids), int(request.max_tokens or self.spec.generation.max_new_tokens)
        )
        kind = RequestOutputKind.DELTA if streaming else RequestOutputKind.FINAL_ONLY
        params = SamplingParams(**sampling_kwargs(request, max_new), output_kind=kind)
        request_id = uuid.uuid4().hex
        completion, finished = 0, False
        self._active.add(request_id)
        try:
            stream = self.llm.generate(tokens_input(prompt_ids), params, request_id)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    output = out.outputs[0]
                    completion += len(output.token_ids)
                    reason = output.finish_reason if out.finished else None
                    if reason in ("abort", "error"):
                        finished = True
                        why = self._stopping or f"generation ended ({reason})"
                        raise EngineError(503, "generation_failed", f"{self.name}: {why}")
                    finished = out.finished
                    end = finish_reason(reason)
                    if end is None:
                        yield GenerationDelta(output.text)
                    else:
                        yield GenerationDelta(output.text, end, len(prompt_ids), completion)
        except EngineError:
            raise
        except Exception as exc:  # vLLM's engine died or refused the request
            finished = True
            raise EngineError(
                503, "generation_failed", f"{self.name}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._active.discard(request_id)
            if not finished:  # the consumer went away: free the sequence now
                await self.llm.abort(request_id)
