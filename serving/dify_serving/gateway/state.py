"""What the gateway holds outside any one request, built once per replica.

The catalog (desired state: file or Kubernetes, `catalog/`), the status cache (what Ray
Serve runs now, `status_cache.py`), the typed replica clients (`replicas.py`) and the
off-loop helpers (cleaning process, embedding coalescers). Lookups that a key's rights
govern (`model`, `index`) and the two changes the API makes (`load`, `unload`) are here
too; the operations themselves are the data plane's (`dataplane/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dify_serving.catalog import open_catalog
from dify_serving.control import AsyncRayDashboard
from dify_serving.gateway import access
from dify_serving.gateway.cleaner import Cleaner
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.replicas import IndexClient, ModelClient
from dify_serving.gateway.status_cache import SERVING, StatusCache
from dify_serving.options import GatewayOptions
from dify_serving.security.secrets import Secrets, read_secret
from dify_serving.specs import DifyIndex, DifyModel, Task
from dify_serving.tasks.cache import ResultCache, open_cache
from dify_serving.tasks.queue import Publisher
from dify_serving.tasks.store import TaskStore


class GatewayState:
    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.dashboard = AsyncRayDashboard(options.dashboard_url) if options.dashboard_url else None
        self.catalog = open_catalog(options, self.dashboard)
        self.status = StatusCache(self.catalog, self.dashboard)
        self.model_replicas = ModelClient(self.catalog, self.status, options)
        self.index_replicas = IndexClient(self.catalog, self.status, options)
        self.coalescers: dict[str, Any] = {}  # model → EmbedCoalescer (dataplane)
        self.cleaner = Cleaner()  # /v1/data/clean, off the event loop
        self._tasks: tuple[TaskStore, Publisher] | None = None  # opened on first use
        self.cache: ResultCache = open_cache(options.cache, _cache_redis_url(options))

    def start(self) -> None:
        """Refresh the status in the background when there is something to read it from."""
        self.status.start(
            background=self.dashboard is not None or self.options.control == "kubernetes"
        )

    def close(self) -> None:
        """Stop the status refresh and the cleaning process (the replica is going)."""
        self.status.close()
        self.cleaner.close()
        if self._tasks is not None:
            self._tasks[0].close()
            self._tasks[1].close()

    def task_backend(self) -> tuple[TaskStore, Publisher]:
        """The task store and the broker publisher (async tasks), opened on first use."""
        if self._tasks is None:
            options = self.options
            database = (
                read_secret("database_url", Path(options.home)) if options.tasks.database else None
            )
            if options.tasks.database and not database:
                raise ApiError(503, "unavailable", "the task database is not configured here")
            self._tasks = (
                TaskStore.open(options.home, database, options.tasks.ttl_s),
                Publisher(options.home, options.tasks),
            )
        return self._tasks
        self.cache.close()

    # lookups a key's rights govern ------------------------------------------------------
    def model(self, name: str | None, task: Task | None = None) -> DifyModel:
        """The model a request names, or the first fitting one the key may use.

        403 when the key may not use it (checked before existence, so a confined key
        learns nothing of other names); 404 when it does not exist.
        """
        models = self.catalog.models()
        wanted = task or Task.TEXT_GENERATION
        if name is None:
            name = self.options.default_model
            if (
                name is None
                or not access.may_use_model(name)
                or (name in models and models[name].spec.task != wanted)
            ):
                fits = [
                    n
                    for n in sorted(models)
                    if models[n].spec.task == wanted and access.may_use_model(n)
                ]
                statuses = self.status.models
                serving = [n for n in fits if statuses.get(n, {}).get("phase") in SERVING]
                name = next(iter(serving or fits), None)
            if name is None:
                raise ApiError(
                    404, "model_not_found", "no model named and no default model is loaded"
                )
        access.check_model(name)
        model = models.get(name)
        if model is None:
            raise ApiError(404, "model_not_found", f"model {name!r} is not loaded")
        return model

    def index(self, name: str) -> DifyIndex:
        """The index a request names; 403 when the key may not use it, else 404 if absent."""
        access.check_index(name)
        index = self.catalog.indexes().get(name)
        if index is None:
            raise ApiError(404, "index_not_found", f"index {name!r} does not exist")
        return index

    # the changes the API makes -----------------------------------------------------------
    async def load(self, model: DifyModel) -> None:
        """Local: store + apply. Cluster: write the DifyModel; the operator applies it."""
        self.model_replicas.forget(model.name)
        phase = await self.catalog.put_model(model)
        self.status.loading(model.name, model.spec, phase)

    async def unload(self, name: str) -> None:
        if not await self.catalog.delete_model(name):
            raise ApiError(404, "model_not_found", f"model {name!r} is not loaded")
        self.model_replicas.end_streams(name)
        self.status.forget(name)


def _cache_redis_url(options: GatewayOptions) -> str | None:
    """The result cache's Redis URL (a secret, read here); refuses to start without it."""
    if not options.cache.redis or options.cache.ttl_s <= 0:
        return None
    secrets = Secrets.load(Path(options.home))
    secrets.require(database=False, redis=True)
    return secrets.redis_url
