"""Which engine serves which task: one table, engines imported only when a model loads.

The table names engines by import path, so importing it costs nothing and no engine
module imports this one back (no circle); a replica imports only its own engine (and its
heavy dependencies). A new task is one line here plus its engine.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from dify_serving.engines import progress, runtimes
from dify_serving.engines.base import ConversionFailed, Engine
from dify_serving.engines.protocol import EngineError
from dify_serving.options import ModelSourceOptions
from dify_serving.specs import DifyModelSpec, Runtime, Task

log = logging.getLogger(__name__)

ENGINES: dict[Task, str] = {
    Task.TEXT_GENERATION: "dify_serving.engines.textgen:TextGenerationEngine",
    Task.FEATURE_EXTRACTION: "dify_serving.engines.embeddings:EmbeddingEngine",
    Task.TEXT_CLASSIFICATION: "dify_serving.engines.pipelines:PipelineEngine",
    Task.IMAGE_CLASSIFICATION: "dify_serving.engines.pipelines:PipelineEngine",
    Task.IMAGE_TO_TEXT: "dify_serving.engines.pipelines:PipelineEngine",
}

#: Engines of a task on a runtime other than its default engine's. (The embeddings
#: engine runs OpenVINO itself: only its forward pass changes.)
RUNTIME_ENGINES: dict[tuple[Task, Runtime], str] = {
    (Task.TEXT_GENERATION, Runtime.OPENVINO): (
        "dify_serving.engines.openvino_textgen:OpenVINOGenerationEngine"
    ),
    (Task.TEXT_GENERATION, Runtime.CTRANSLATE2): (
        "dify_serving.engines.ctranslate2_textgen:CTranslate2Engine"
    ),
    (
        Task.TEXT_GENERATION,
        Runtime.VLLM,
    ): "dify_serving.engines.vllm_generator:VllmGenerationEngine",
}


def engine_class(task: Task, runtime: Runtime = Runtime.TORCH) -> type[Engine]:
    path = RUNTIME_ENGINES.get((task, runtime)) or ENGINES.get(task)
    if path is None:
        raise EngineError(422, "unsupported_task", f"no engine serves the task {task}")
    module, _, name = path.partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module), name)
    return cls


def load_engine(
    name: str, spec: DifyModelSpec, home: Path, sources: ModelSourceOptions | None = None
) -> Engine:
    """Resolve the weights (under the allowed roots) and build the engine for `spec.task`."""
    from dify_serving.engines import weights

    progress.report(f"resolving {spec.model_id}")
    path = weights.resolve(spec.model_id, home, sources, spec.revision)
    task, runtime = Task(spec.task), runtimes.resolve(spec)
    size = weights.weights_bytes(path)
    of = f" ({size / 1e6:,.1f} MB)" if size else ""
    progress.report(f"loading weights{of} of {spec.model_id} on {runtime}")
    try:
        return engine_class(task, runtime)(name, spec, path, home=home)
    except ConversionFailed as exc:  # the fast engine could not take the model: torch can
        log.warning("%s: %s; running torch", name, exc)
        progress.report(f"{exc}; loading {spec.model_id} on torch")
        engine = engine_class(task)(name, spec, path, home=home)
        engine.runtime_note = f"{exc}; running torch"
        return engine
