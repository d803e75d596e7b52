"""The Serve deployment that hosts one engine: one `ModelServer` app per DifyModel.

The deployment owns "spec → engine"; Serve options (replicas, CPUs, GPUs, threads) come
from the rendered config. A model that cannot load raises in the constructor, so Serve
marks the app DEPLOY_FAILED with the reason, while every other app keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from dify_serving.engines import load_engine
from dify_serving.options import ModelSourceOptions
from dify_serving.specs import DifyModelSpec

log = logging.getLogger("dify_serving.model")


@serve.deployment(name="ModelServer")
class ModelServer:
    async def __init__(  # type: ignore[misc]
        self, name: str, spec: dict[str, Any], home: str, sources: dict[str, Any] | None = None
    ) -> None:
        self.name = name
        self.spec = DifyModelSpec.model_validate(spec)
        allowed = ModelSourceOptions.model_validate(sources or {})
        # Embeddings batch inside the engine (continuous batching across requests).
        self.engine = load_engine(name, self.spec, Path(home), allowed)
        await self.engine.start()

    async def info(self) -> dict[str, Any]:
        return self.engine.info()

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.engine.generate(request)

    async def generate_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.engine.generate_stream(request):
            yield item

    async def embed_each(self, requests: list[tuple[list[str], bool]]) -> list[dict[str, Any]]:
        return await self.engine.embed_each(requests)

    async def embed_tokens(self, rows: list[list[int]]) -> Any:
        """Vectors for rows already tokenized (and limited) by the caller: an index."""
        return await self.engine.embed_tokens(rows)

    async def predict(self, inputs: list[Any], options: dict[str, Any]) -> list[Any]:
        return await self.engine.predict(inputs, options)

    async def __del__(self) -> None:
        await self.engine.stop("model unloaded")


def build_model_app(args: dict[str, Any]) -> Any:
    """Serve application builder (the `import_path` of every model app)."""
    app: Any = ModelServer
    return app.bind(args["name"], args["spec"], args["home"], args.get("sources"))
