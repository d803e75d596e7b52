"""The gateway's side of version switching: start a switch or a rollback, and move every
running one on after each status refresh (`rollout.advance`, pure, decides the step).

One machine: the change goes to the local state file, which is rendered and applied to
Ray Serve at once. A cluster: it is written into the DifyModel, and the operator renders
and applies it like any other change. Either way each step is one write of the whole
model, taken under a lock here and checked against a fresh read, so a switch and a step
of the controller never overwrite each other in this replica.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dify_serving.catalog import Catalog
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.replicas import ModelClient
from dify_serving.gateway.status_cache import StatusCache
from dify_serving.options import GatewayOptions
from dify_serving.rollout import advance, start, switch_target
from dify_serving.specs import DifyModel, DifyModelSpec, Rollout, SwitchStrategy

log = logging.getLogger(__name__)

#: Seconds a retired version runs at least after the weights moved, on one machine
#: (every request re-reads the state file when it changed).
LOCAL_PROPAGATION_S = 1.0


class Rollouts:
    def __init__(
        self,
        catalog: Catalog,
        status: StatusCache,
        replicas: ModelClient,
        options: GatewayOptions,
    ) -> None:
        self.catalog = catalog
        self.status = status
        self.replicas = replicas
        self._lock = asyncio.Lock()
        # Gateways in a cluster see a new DifyModel at their next catalog refresh.
        local = options.control != "kubernetes"
        self.drain_min_s = LOCAL_PROPAGATION_S if local else catalog.idle_refresh_s + 1.0
        self.drain_max_s = options.request_timeout_s + 5.0

    async def switch(
        self, name: str, version: str, strategy: SwitchStrategy, weight: int | None
    ) -> Rollout:
        """Start moving `name`'s traffic to `version` (all of it, or `weight` percent)."""
        async with self._lock:
            model = self._model(name)
            spec = model.spec
            if spec.version(version) is None:
                known = ", ".join(v.name for v in spec.versions) or "none"
                raise ApiError(
                    404,
                    "version_not_found",
                    f"model {name!r} has no version {version!r} (it has: {known})",
                )
            self._not_running(name, spec)
            if strategy == SwitchStrategy.CANARY and weight is None:
                raise ApiError(422, "invalid_request", "weight: a canary needs its share (1-100)")
            try:
                target = switch_target(spec, version, strategy, weight)
            except ValueError as exc:
                raise ApiError(409, "switch_impossible", str(exc)) from None
            return await self._start(model, target, strategy)

    async def rollback(self, name: str) -> Rollout:
        """Go back to the weights before the last switch (through the same steps)."""
        async with self._lock:
            model = self._model(name)
            rollout = model.spec.rollout
            if rollout is None or not rollout.previous:
                raise ApiError(
                    409, "nothing_to_roll_back", f"model {name!r} has had no switch to undo"
                )
            return await self._start(model, dict(rollout.previous), SwitchStrategy.BLUE_GREEN)

    async def tick(self) -> None:
        """Move every running rollout on by one step (after each status refresh)."""
        for name, model in list(self.catalog.models().items()):
            rollout = model.spec.rollout
            if rollout is None or not rollout.running:
                continue
            drained = {v: await self._drained(f"{name}@{v}") for v in rollout.draining}
            versions = {
                v["name"]: v for v in self.status.models.get(name, {}).get("versions") or []
            }
            spec = advance(
                model,
                versions,
                drained.__getitem__,
                time.time(),
                self.drain_min_s,
                self.drain_max_s,
            )
            if spec is None:
                continue
            async with self._lock:
                fresh = self.catalog.models().get(name)
                if fresh is None or fresh.spec.rollout != rollout:
                    continue  # changed meanwhile (a new switch, an unload): look again next time
                await self._put(model, spec)
            assert spec.rollout is not None
            log.info("model %s: rollout %s (%s)", name, spec.rollout.phase, spec.rollout.message)

    async def _start(
        self, model: DifyModel, target: dict[str, int], strategy: SwitchStrategy
    ) -> Rollout:
        spec = start(model.spec, target, strategy, time.time())
        await self._put(model, spec)
        assert spec.rollout is not None
        return spec.rollout

    async def _put(self, model: DifyModel, spec: DifyModelSpec) -> None:
        await self.catalog.put_model(model.model_copy(update={"spec": spec}))
        self.status.refresh_soon()

    async def _drained(self, target: str) -> bool:
        """No request of this gateway on it, and its engine runs none (where it counts)."""
        if self.replicas.held(target) > 0:
            return False
        info = await self.replicas.info(target)
        return not info.get("active_requests")

    def _model(self, name: str) -> DifyModel:
        model = self.catalog.models().get(name)
        if model is None:
            raise ApiError(404, "model_not_found", f"model {name!r} is not loaded")
        if not model.spec.versions:
            raise ApiError(
                404,
                "version_not_found",
                f"model {name!r} has no versions: load it with `versions` to switch",
            )
        return model

    @staticmethod
    def _not_running(name: str, spec: DifyModelSpec) -> None:
        rollout = spec.rollout
        if rollout is not None and rollout.running:
            target = ", ".join(f"{n} {w}%" for n, w in rollout.target.items() if w > 0)
            raise ApiError(
                409,
                "switch_in_progress",
                f"model {name!r} is switching to {target} ({rollout.phase}); wait until it "
                "ends, or roll it back",
            )
