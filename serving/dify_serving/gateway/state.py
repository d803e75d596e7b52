"""What the gateway holds outside any one request, built once per replica.

The catalog (desired state: file or Kubernetes, `catalog/`), the status cache (what Ray
Serve runs now, `status_cache.py`), the typed replica clients (`replicas.py`) and the
off-loop helpers (cleaning process, embedding coalescers). Lookups that a key's rights
govern (`model`, `index`) and the two changes the API makes (`load`, `unload`) are here
too; the operations themselves are the data plane's (`dataplane/`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from dify_serving.catalog import IndexRemoval, open_catalog
from dify_serving.control import AsyncRayDashboard
from dify_serving.gateway import access
from dify_serving.gateway.cleaner import Cleaner
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.replicas import IndexClient, ModelClient
from dify_serving.gateway.rollouts import Rollouts
from dify_serving.gateway.served import record as record_version
from dify_serving.gateway.status_cache import SERVING, StatusCache
from dify_serving.options import GatewayOptions
from dify_serving.rollout import loaded_versions
from dify_serving.security.secrets import Secrets, read_secret
from dify_serving.specs import DifyIndex, DifyModel, Task
from dify_serving.status import index_status
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
        self.rollouts = Rollouts(self.catalog, self.status, self.model_replicas, options)
        self.status.after_refresh = self.rollouts.tick
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
        self.cache.close()

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

    # lookups a key's rights govern ------------------------------------------------------
    def model(self, name: str | None, task: Task | None = None) -> DifyModel:
        """The model a request names, or the first fitting one the key may use; for a
        versioned model, the version that serves this request (`served`).

        `name@version` pins a version. 403 when the key may not use the model (checked
        before existence, so a confined key learns nothing of other names); 404 when it
        does not exist.
        """
        models = self.catalog.models()
        wanted = task or Task.TEXT_GENERATION
        pinned = None
        if name is not None:
            name, _, pinned = name.partition("@")
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
        return self.served(model, pinned or None)

    def served(self, model: DifyModel, pinned: str | None = None) -> DifyModel:
        """`model` as the version that answers one request: `pinned`, else one drawn by
        the weights among the versions with traffic that serve, else among the loaded
        versions without traffic that serve, else among all those with traffic (the
        request gets their clear 503). Unversioned: `model` itself."""
        spec = model.spec
        if not spec.versions:
            if pinned:
                raise ApiError(404, "version_not_found", f"model {model.name!r} has no versions")
            return model
        if pinned:
            if spec.version(pinned) is None:
                raise ApiError(
                    404,
                    "version_not_found",
                    f"model {model.name!r} has no version {pinned!r}",
                )
            if pinned not in loaded_versions(spec):
                raise ApiError(
                    404,
                    "version_not_found",
                    f"version {pinned!r} of model {model.name!r} is not loaded "
                    "(weight 0); switch to it first",
                )
            record_version(pinned)
            return model.at_version(pinned)
        live = [v for v in spec.versions if v.weight > 0]
        targets = self.status.targets

        def serves(name: str) -> bool:
            return targets.get(f"{model.name}@{name}", {}).get("phase") in SERVING

        serving = [v for v in live if serves(v.name)]
        # none of them serves: a version still loaded beside them (one draining after a
        # switch, or a switch's target) answers rather than a 503, as old pods keep
        # serving until the new ones are Ready
        loaded = set(loaded_versions(spec))
        standby = [
            v for v in spec.versions if v.weight == 0 and v.name in loaded and serves(v.name)
        ]
        pool = serving or standby or live
        chosen = random.choices(pool, weights=[max(v.weight, 1) for v in pool])[0]
        record_version(chosen.name)
        return model.at_version(chosen.name)

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

    async def create_index(self, index: DifyIndex) -> dict[str, Any]:
        """Local: store + apply. Cluster: write the DifyIndex; the operator applies it.
        Returns its first status: Pending while its embedding model is missing, Failed
        when that model does not embed (as for an index from a manifest)."""
        self.index_replicas.forget(index.name)
        phase = await self.catalog.create_index(index)
        models = self.catalog.models()
        status = index_status(index.name, index.spec, models, {})
        model = models.get(index.spec.embedding_model)
        if model is not None and model.spec.task == Task.FEATURE_EXTRACTION:
            status.update(phase=phase.value, message=f"{phase.value}: starting its replica")
        self.status.indexes[index.name] = status
        self.status.refresh_soon()
        return status

    async def delete_index(self, name: str) -> IndexRemoval:
        """Remove the index (its app, then its vectors with `reclaimPolicy: Delete`)."""
        removal = await self.catalog.delete_index(name)
        if removal is None:
            raise ApiError(404, "index_not_found", f"index {name!r} does not exist")
        self.index_replicas.forget(name)
        self.status.indexes.pop(name, None)
        self.status.refresh_soon()
        return removal


def _cache_redis_url(options: GatewayOptions) -> str | None:
    """The result cache's Redis URL (a secret, read here); refuses to start without it."""
    if not options.cache.redis or options.cache.ttl_s <= 0:
        return None
    secrets = Secrets.load(Path(options.home))
    secrets.require(database=False, redis=True)
    return secrets.redis_url
