"""The Serve deployment that hosts one engine: one `ModelServer` app per DifyModel.

The deployment owns "spec → engine"; Serve options (replicas, CPUs, GPUs, threads) come
from the rendered config. A model that cannot load raises in the constructor, so Serve
marks the app DEPLOY_FAILED with the reason, while every other app keeps serving.

The replica answers `info()` and the methods of its engine's capabilities
(`engines.protocol.capability_methods`), bound at load: a handle call to a method the
engine lacks fails in Serve, and nothing here lists tasks. Each bound method is wrapped
once, generically, by the replica's telemetry (`telemetry.ModelTelemetry`: requests,
latency, tokens, time to first token ...), which pushes its figures to the metrics hub
for `GET /v1/metrics`; labels are the model's name and version only.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from ray import serve

from dify_serving.engines import progress
from dify_serving.engines.protocol import capability_methods
from dify_serving.engines.registry import load_engine
from dify_serving.options import ModelSourceOptions
from dify_serving.specs import DifyModelSpec
from dify_serving.telemetry import ModelTelemetry

log = logging.getLogger(__name__)


@serve.deployment(name="ModelServer")
class ModelServer:
    async def __init__(  # type: ignore[misc]
        self,
        name: str,
        spec: dict[str, Any],
        home: str,
        sources: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.spec = DifyModelSpec.model_validate(spec)
        allowed = ModelSourceOptions.model_validate(sources or {})
        self.telemetry = ModelTelemetry(name, version)
        started = time.perf_counter()
        try:
            with progress.reporting(functools.partial(progress.publish_stage, name)):
                self.engine = load_engine(name, self.spec, Path(home), allowed)
                progress.report("warming up")
            for method in capability_methods(self.engine):
                setattr(self, method, self.telemetry.wrap(method, getattr(self.engine, method)))
            await self.engine.start()  # the warm-up calls the engine: not counted
            self.engine.on_batch = self.telemetry.observe_batch  # type: ignore[method-assign]
            self.telemetry.watch_engine(self.engine.queue_state)
        finally:  # loaded or failed: the stage is over either way
            progress.clear_stage(name)
        self.telemetry.load_seconds.set(time.perf_counter() - started)
        self.telemetry.pusher.start()

    async def info(self) -> dict[str, Any]:
        queue = self.engine.queue_state() or {}  # running / waiting, where the engine knows
        return {
            **self.engine.info(),
            **{f"{k}_requests": queue[k] for k in queue.keys() & {"running", "waiting"}},
        }

    async def check_health(self) -> None:
        """Serve's health check: an engine that can no longer serve fails it, and Serve
        replaces the replica (an OpenVINO worker process that died, say)."""
        if not self.engine.healthy():
            raise RuntimeError(f"{self.name}: the engine can no longer serve")

    async def __del__(self) -> None:
        self.telemetry.pusher.stop()
        await self.engine.stop("model unloaded")


def build_model_app(args: dict[str, Any]) -> Any:
    """Serve application builder (the `import_path` of every model app)."""
    app: Any = ModelServer
    return app.bind(
        args["name"], args["spec"], args["home"], args.get("sources"), args.get("version")
    )
