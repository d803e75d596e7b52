"""Which runtime runs a model: `spec.engine`, or for `auto` the fastest one installed.

The order for `auto` is measured, not assumed (docs/benchmarks.md, `make bench`):
embeddings on CPU run 1.35× (AVX2) to 2.5× (AVX-512) faster on OpenVINO than on torch;
greedy generation on CPU 2.1–2.6× (AVX2) to 3.1× faster on CTranslate2 (fp32: it has no
bf16 kernels on CPU, so bf16 runs on torch where the CPU has bf16, and on CTranslate2 in
fp32 where it has not); on CUDA, vLLM is what GPU users expect. A runtime that is not
installed is skipped by `auto` and refused (422, naming the extra) when asked for.

Light on purpose: the gateway imports it to check a load before any replica starts.
"""

from __future__ import annotations

import importlib.util

from dify_serving.engines.base import effective_precision
from dify_serving.engines.protocol import EngineError
from dify_serving.specs import RUNTIME_EXTRAS, DifyModelSpec, Precision, Runtime, Task


def installed(runtime: Runtime) -> bool:
    if runtime in (Runtime.TORCH, Runtime.AUTO):
        return True
    return importlib.util.find_spec(RUNTIME_EXTRAS[runtime]) is not None


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
        if effective_precision(spec)[0] in (Precision.FP32, Precision.INT8):
            return [Runtime.CTRANSLATE2]  # bf16 on a CPU without bf16 too (it runs fp32)
    return []


def resolve(spec: DifyModelSpec) -> Runtime:
    """The runtime that will run `spec` here (never AUTO)."""
    if spec.engine == Runtime.AUTO:
        runtime = next((r for r in preferred(spec) if installed(r)), Runtime.TORCH)
        if spec.precision == Precision.INT8 and runtime != Runtime.CTRANSLATE2:
            raise EngineError(422, "engine_not_installed", not_installed(Runtime.CTRANSLATE2))
        return runtime
    runtime = Runtime(spec.engine)
    if not installed(runtime):
        raise EngineError(422, "engine_not_installed", not_installed(runtime))
    return runtime
