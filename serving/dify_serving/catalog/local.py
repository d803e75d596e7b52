"""The desired state on one machine: the state file, rendered and applied by the gateway.

A change (`put_model`, `delete_model`, `create_index`, `delete_index`) is written to the
file under its lock, then the whole state is rendered and applied to Ray Serve through
the dashboard, exactly as the operator does in a cluster.

Deleting an index with `reclaimPolicy: Delete` is what the operator's finalizer does: the
index leaves the state, the render without it makes Serve remove its app, and once Serve
no longer lists the app the vectors go (`catalog/reclaim.py`, under the shard's lock, so
no replica has them open). The request waits for that up to `RECLAIM_WAIT_S`; past it the
gateway finishes in the background and the route answers 202.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from dify_serving.catalog import CollectionInUse, IndexExists, IndexRemoval, Unreachable
from dify_serving.catalog.files import LocalStateStore
from dify_serving.catalog.reclaim import ReclaimPending, ReclaimRefused, reclaim_vectors
from dify_serving.control import AsyncRayDashboard, RayUnavailable
from dify_serving.errors import DifyError
from dify_serving.manifests import DesiredState
from dify_serving.options import ServeOptions
from dify_serving.render import index_app_name, render_serve_config
from dify_serving.specs import (
    DifyIndex,
    DifyModel,
    Phase,
    shared_collection_message,
    shared_collections,
    store_key,
)

log = logging.getLogger(__name__)

#: Seconds `DELETE /v1/indexes/{name}` waits for the replica to go and the vectors with it.
RECLAIM_WAIT_S = 30.0
#: Seconds the gateway keeps trying after that (Serve slow to stop the replica) before it
#: gives up and leaves the vectors where they are (logged).
RECLAIM_GIVE_UP_S = 600.0


class LocalCatalog:
    idle_refresh_s = 5.0

    def __init__(self, home: str | Path, dashboard: AsyncRayDashboard | None) -> None:
        self.file = LocalStateStore(home)
        self.home = Path(home)
        self.dashboard = dashboard
        self._reclaims: dict[str, asyncio.Task[IndexRemoval]] = {}  # index → its reclaim

    def models(self) -> dict[str, DifyModel]:
        return self.file.load()[0].models

    def indexes(self) -> dict[str, DifyIndex]:
        return self.file.load()[0].indexes

    def serve_options(self) -> ServeOptions:
        return self.file.load()[1]

    async def refresh(self) -> None:
        """Nothing to do: the file is re-read when it changes."""

    async def put_model(self, model: DifyModel) -> Phase:
        def change(state: DesiredState, _: Any) -> None:
            state.models[model.name] = model

        await self._apply(*await asyncio.to_thread(self.file.update, change))
        return Phase.LOADING

    async def delete_model(self, name: str) -> bool:
        if name not in self.models():
            return False

        def change(state: DesiredState, _: Any) -> None:
            state.models.pop(name, None)

        await self._apply(*await asyncio.to_thread(self.file.update, change))
        return True

    async def create_index(self, index: DifyIndex) -> Phase:
        reclaim = self._reclaims.get(index.name)
        if reclaim is not None and not reclaim.done():
            raise IndexExists(index.name, deleting=True)

        def change(state: DesiredState, options: ServeOptions) -> None:
            if index.name in state.indexes:
                raise IndexExists(index.name)
            state.indexes[index.name] = index
            specs = [(name, i.spec) for name, i in state.indexes.items()]
            for name, owner in shared_collections(specs, options.qdrant_url).items():
                if index.name in (name, owner):
                    other = owner if name == index.name else name
                    message = shared_collection_message(index.name, other, index.spec)
                    raise CollectionInUse(message)

        await self._apply(*await asyncio.to_thread(self.file.update, change))
        return Phase.LOADING

    async def delete_index(self, name: str) -> IndexRemoval | None:
        if name not in self.indexes():
            return None
        gone: list[DifyIndex] = []

        def change(state: DesiredState, _: Any) -> None:
            if name in state.indexes:
                gone.append(state.indexes.pop(name))

        state, options = await asyncio.to_thread(self.file.update, change)
        if not gone:
            return None
        index = gone[0]
        await self._apply(state, options)
        if index.spec.reclaim_policy == "Retain":
            message = "vectors kept (reclaimPolicy: Retain): creating the index again finds them"
            return IndexRemoval("Retain", "retained", message, done=True)
        task = asyncio.get_running_loop().create_task(self._reclaim(index, options.qdrant_url))
        self._reclaims[name] = task
        task.add_done_callback(lambda t: self._reclaims.pop(name, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), RECLAIM_WAIT_S)
        except TimeoutError:
            message = "its replica is still stopping; the vectors go once it has"
            return IndexRemoval("Delete", "deleting", message, done=False)

    async def _reclaim(self, index: DifyIndex, qdrant_url: str | None) -> IndexRemoval:
        """Once Serve no longer runs the index, remove its vectors (unless an index of the
        state uses the same collection again: re-created meanwhile, or sharing it)."""
        deadline = time.monotonic() + RECLAIM_GIVE_UP_S
        name = index.name
        kept = "vectors kept: "
        try:
            await self._app_gone(name, deadline)
            key = store_key(name, index.spec, qdrant_url)
            users = sorted(
                other
                for other, i in self.indexes().items()
                if store_key(other, i.spec, qdrant_url) == key
            )
            if users:
                return IndexRemoval(
                    "Delete", "retained", kept + f"{', '.join(users)} use them", True
                )
            wait = max(1.0, deadline - time.monotonic())
            said = await asyncio.to_thread(
                reclaim_vectors, name, index.spec, self.home, qdrant_url, wait
            )
        except (ReclaimRefused, ReclaimPending, TimeoutError) as exc:
            log.warning("index %s: vectors not reclaimed: %s", name, exc)
            reason = "they could not be removed (the store refused or was unreachable, or a "
            reason += "replica kept them open); see the gateway log"
            return IndexRemoval("Delete", "retained", kept + reason, done=True)
        log.info("index %s deleted: %s", name, said)
        collection = index.spec.store.collection or name
        return IndexRemoval("Delete", "deleted", f"collection {collection} removed", done=True)

    async def _app_gone(self, name: str, deadline: float) -> None:
        """Until Serve no longer lists the index's app (its replica has stopped)."""
        app = index_app_name(name)
        while self.dashboard is not None:
            try:
                apps = (await self.dashboard.get_applications()).get("applications") or {}
                if app not in apps:
                    return
            except RayUnavailable as exc:
                log.warning("waiting for %s to stop: %s", app, exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve still runs {app}")
            await asyncio.sleep(0.25)

    async def _apply(self, state: DesiredState, options: ServeOptions) -> None:
        if self.dashboard is None:
            raise DifyError(503, "no_control", "this gateway has no Ray dashboard to apply changes")
        try:
            await self.dashboard.put_applications(render_serve_config(state, options))
        except RayUnavailable as exc:
            log.warning("applying the Serve config failed: %s", exc)
            raise Unreachable("Ray Serve", "ray_unavailable", " to apply the change") from None
