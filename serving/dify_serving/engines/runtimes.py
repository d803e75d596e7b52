"""Which runtime runs a model: `spec.engine`, or for `auto` the fastest one installed.

The order for `auto` is measured, not assumed (docs/benchmarks.md, `make bench`):
embeddings on CPU run 1.35× (AVX2) to 2.5× (AVX-512) faster on OpenVINO than on torch;
generation on CPU runs on OpenVINO GenAI's continuous batching (4.3× transformers' in
fp32 with the same greedy tokens, 6–7× in bf16, against CTranslate2's 2.9–3.2× in fp32;
CTranslate2 has no bf16 kernels on CPU) and falls back to CTranslate2 where
openvino-genai is missing; int8 runs on CTranslate2, which checks its agreement. On CUDA,
vLLM is what GPU users expect. A runtime that is not installed is skipped by `auto` and
refused (422, naming the extra) when asked for.

Light on purpose: the gateway imports it to check a load before any replica starts.
"""

from __future__ import annotations

import importlib.util

from dify_serving.engines.base import effective_precision
from dify_serving.engines.protocol import EngineError
from dify_serving.specs import RUNTIME_EXTRAS, DifyModelSpec, Precision, Runtime, Task

#: Modules a runtime needs for a task beyond its own (its extra installs them).
TASK_MODULES: dict[tuple[Runtime, Task | None], str] = {
    (Runtime.OPENVINO, Task.TEXT_GENERATION): "openvino_genai"
}


def installed(runtime: Runtime, task: Task | None = None) -> bool:
    if runtime in (Runtime.TORCH, Runtime.AUTO):
        return True
    modules = [RUNTIME_EXTRAS[runtime], TASK_MODULES.get((runtime, task))]
    return all(importlib.util.find_spec(m) is not None for m in modules if m)


def not_installed(runtime: Runtime) -> str:
    extra = RUNTIME_EXTRAS[runtime]
    return f"engine {runtime} is not installed here: pip install 'dify-mirror[{extra}]'"


def preferred(spec: DifyModelSpec) -> list[Runtime]:
    """The runtimes `auto` tries for this task, device and precision, fastest first."""
    task, cuda = Task(spec.task), spec.uses_cuda
    if task in (Task.FEATURE_EXTRACTION, Task.TEXT_CLASSIFICATION) and not cuda:
        return [Runtime.OPENVINO]
    if task == Task.TEXT_GENERATION:
        if cuda:
            return [Runtime.VLLM]
        precision = effective_precision(spec)[0]  # bf16 on a CPU without bf16: fp32
        if precision == Precision.INT8:
            return [Runtime.CTRANSLATE2]
        if precision == Precision.FP32:
            return [Runtime.OPENVINO, Runtime.CTRANSLATE2]
        return [Runtime.OPENVINO]  # bf16: CTranslate2 would run it in fp32
    return []


def resolve(spec: DifyModelSpec) -> Runtime:
    """The runtime that will run `spec` here (never AUTO)."""
    if spec.engine == Runtime.AUTO:
        task = Task(spec.task)
        runtime = next((r for r in preferred(spec) if installed(r, task)), Runtime.TORCH)
        if spec.precision == Precision.INT8 and runtime != Runtime.CTRANSLATE2:
            raise EngineError(422, "engine_not_installed", not_installed(Runtime.CTRANSLATE2))
        return runtime
    runtime = Runtime(spec.engine)
    if not installed(runtime, Task(spec.task)):
        raise EngineError(422, "engine_not_installed", not_installed(runtime))
    return runtime
