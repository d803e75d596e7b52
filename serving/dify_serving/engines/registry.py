"""Which engine serves which task: one table, engines imported only when a model loads.

The table names engines by import path, so importing it costs nothing and no engine
module imports this one back (no circle); a replica imports only its own engine (and its
heavy dependencies). A new task is one line here plus its engine.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from dify_serving.engines.base import Engine
from dify_serving.engines.protocol import EngineError
from dify_serving.options import ModelSourceOptions
from dify_serving.specs import DifyModelSpec, Task

ENGINES: dict[Task, str] = {
    Task.TEXT_GENERATION: "dify_serving.engines.textgen:TextGenerationEngine",
    Task.FEATURE_EXTRACTION: "dify_serving.engines.embeddings:EmbeddingEngine",
    Task.TEXT_CLASSIFICATION: "dify_serving.engines.pipelines:PipelineEngine",
    Task.IMAGE_CLASSIFICATION: "dify_serving.engines.pipelines:PipelineEngine",
    Task.IMAGE_TO_TEXT: "dify_serving.engines.pipelines:PipelineEngine",
}


def engine_class(task: Task) -> type[Engine]:
    path = ENGINES.get(task)
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

    path = weights.resolve(spec.model_id, home, sources, spec.revision)
    return engine_class(Task(spec.task))(name, spec, path, home=home)
