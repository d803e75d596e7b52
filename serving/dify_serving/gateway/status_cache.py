"""Which models and indexes answer now: Ray Serve's status, cached and refreshed.

Refreshed in the background (fast while something is loading, slow otherwise, and at
once after a change), so a request to a model that is not Ready gets a clear 503 at once
instead of waiting on a replica that may never come. Readiness reads when the last
refresh worked and why the last one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import ChainMap
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dify_serving.catalog import Catalog
from dify_serving.control import AsyncRayDashboard, RayUnavailable
from dify_serving.engines.progress import loading_stages
from dify_serving.specs import Phase
from dify_serving.status import (
    awaiting_placement,
    concurrency_hint,
    index_status,
    model_status,
)

#: Phases whose status message is the loading replica's stage, when it published one.
LOADING_PHASES = (Phase.PENDING.value, Phase.LOADING.value)

log = logging.getLogger(__name__)

SERVING = frozenset({Phase.READY.value, Phase.DEGRADED.value})


class StatusCache:
    def __init__(self, catalog: Catalog, dashboard: AsyncRayDashboard | None) -> None:
        self.catalog = catalog
        self.dashboard = dashboard
        self.models: dict[str, dict[str, Any]] = {}
        #: `name@version` of each loaded version of a versioned model: its own status.
        self.versions: dict[str, dict[str, Any]] = {}
        #: Called after each refresh that read Serve (the gateway moves rollouts on).
        self.after_refresh: Callable[[], Awaitable[None]] | None = None
        self.indexes: dict[str, dict[str, Any]] = {}
        self.cluster_gpus: float | None = None
        self.cold_starts: dict[str, float] = {}  # model → seconds of its last wake from zero
        self.waiting_since: dict[str, float] = {}  # model → since when requests wait in it
        self.refreshed_at: float | None = None  # time.monotonic() of the last that worked
        self.refresh_failure: str | None = None  # a short reason code
        self.generation = 0  # counts refreshes that read Serve: specs may have changed
        self._refresher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._refresh_started = float("-inf")
        self._on_demand: asyncio.Task[None] | None = None
        # One read at a time: two overlapping reads could end in the other order, and the
        # older view would replace the newer (a version that just took traffic seen as
        # still starting: 503s until the next refresh; CI saw it during a switch).
        self._reading = asyncio.Lock()

    def start(self, background: bool) -> None:
        if self._refresher is None and background:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()

    @property
    def refreshing(self) -> bool:
        """Whether the background refresh loop runs (it does in a Serve replica)."""
        return self._refresher is not None and not self._refresher.done()

    def refresh_soon(self) -> None:
        """Wake the refresh loop now (after a change, or to see an outage sooner)."""
        self._wake.set()

    def serving(self, statuses: Mapping[str, dict[str, Any]], name: str) -> bool:
        return statuses.get(name, {}).get("phase") in SERVING

    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # recorded and logged; keep refreshing
                await self.refresh()
            busy = any(s["phase"] not in SERVING for s in self.models.values())
            idle = self.catalog.idle_refresh_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5 if busy else idle)
            self._wake.clear()

    async def refresh_if_older(self, age_s: float) -> None:
        """Refresh unless one started within `age_s`; callers meanwhile share one refresh."""
        task = self._on_demand
        if task is None or task.done():
            if time.monotonic() - self._refresh_started < age_s:
                return
            task = self._on_demand = asyncio.get_running_loop().create_task(self._quietly())
        await asyncio.shield(task)

    async def _quietly(self) -> None:
        with contextlib.suppress(Exception):  # recorded in refresh_failure
            await self.refresh()

    async def refresh(self) -> dict[str, dict[str, Any]]:
        """Read Serve's status now (after a read already running); records when it
        worked or why it did not."""
        self._refresh_started = time.monotonic()
        try:
            async with self._reading:
                statuses = await self._read()
        except RayUnavailable as exc:
            self.refresh_failure = "ray_unavailable"
            log.warning("status refresh failed: %s", exc)
            raise
        except Exception as exc:
            self.refresh_failure = "status_unavailable"
            log.warning("status refresh failed: %s: %s", type(exc).__name__, exc)
            raise
        self.refreshed_at, self.refresh_failure = time.monotonic(), None
        return statuses

    async def _read(self) -> dict[str, dict[str, Any]]:
        await self.catalog.refresh()
        if self.dashboard is None:
            return self.models
        apps = (await self.dashboard.get_applications()).get("applications") or {}
        if self.cluster_gpus is None:
            import ray

            self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        free, now = None, time.time()
        if any(awaiting_placement(app) for app in apps.values()):  # can Ray place them?
            import ray

            free = await asyncio.to_thread(ray.available_resources)
        models = self.catalog.models()
        self.generation += 1
        self.models = {
            name: model_status(name, m.spec, apps, self.cluster_gpus, free, now)
            for name, m in models.items()
        }
        for name, seconds in self.cold_starts.items():
            if name in self.models:
                self.models[name]["last_cold_start_s"] = seconds
        loading = [
            n
            for n, s in self.models.items()
            if s["phase"] in LOADING_PHASES and not s.get("reason")  # versioned: no reason
        ]
        if loading:  # what those replicas do now (converting, warming up), not a bare phase
            stages = await asyncio.to_thread(loading_stages, set(models))
            for name in loading:
                if name in stages:
                    self.models[name]["message"] = stages[name]
        self.indexes = {
            name: index_status(name, i.spec, models, apps)
            for name, i in self.catalog.indexes().items()
        }
        self._index_targets()
        if self.after_refresh is not None:
            try:
                await self.after_refresh()
            except Exception:  # a rollout step failed (catalog down): the next refresh retries
                log.warning("moving a rollout on failed", exc_info=True)
        return self.models

    @property
    def targets(self) -> Mapping[str, dict[str, Any]]:
        """What a model client may call, by target: each model (`name`) and each loaded
        version of a versioned one (`name@version`)."""
        return ChainMap(self.models, self.versions)

    def _index_targets(self) -> None:
        self.versions = {
            f"{name}@{version['name']}": version
            for name, status in self.models.items()
            for version in status.get("versions") or []
            if version.get("phase") is not None
        }

    def loading(self, name: str, spec: Any, phase: Phase) -> None:
        """A model just put into the catalog: `phase` until Serve reports on it."""
        self.models[name] = {
            **model_status(name, spec, {}, self.cluster_gpus),
            "phase": phase.value,
        }
        self._index_targets()
        self.refresh_soon()

    def waiting_hint(self, name: str, spec: Any, waiting: float | None) -> str | None:
        """The "adjust concurrency" hint once a model's requests keep waiting."""
        since, hint = concurrency_hint(spec, waiting, self.waiting_since.get(name), time.time())
        if since is None:
            self.waiting_since.pop(name, None)
        else:
            self.waiting_since[name] = since
        return hint

    def asleep(self, name: str) -> bool:
        """Whether the model is scaled to zero as last seen: its next call is a cold start."""
        return bool(self.models.get(name, {}).get("scaled_to_zero"))

    def woke(self, name: str, seconds: float) -> None:
        """A call that found the model scaled to zero was answered after `seconds`."""
        self.cold_starts[name] = round(seconds, 3)
        if name in self.models:  # awake now: the calls after it are not cold starts
            self.models[name].update(last_cold_start_s=self.cold_starts[name], scaled_to_zero=False)
        self.refresh_soon()

    def forget(self, name: str) -> None:
        self.models.pop(name, None)
        self.cold_starts.pop(name, None)
        self._index_targets()
