"""What the gateway knows and does outside any one request.

The desired state (which models exist, their specs) comes from the store; which of them
answer now comes from Ray Serve's status, cached and refreshed in the background (fast
while something is loading, slow otherwise), so a request to a model that is not Ready
gets a clear 503 at once instead of waiting on a replica that may never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from ray import serve
from ray.exceptions import RayTaskError

from dify_serving.control import AsyncRayDashboard, RayUnavailable
from dify_serving.engines.base import EngineError
from dify_serving.gateway import access
from dify_serving.gateway.cleaner import Cleaner
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.inflight import INDEX_BOUND, InFlight, model_bound
from dify_serving.gateway.notes import note
from dify_serving.gateway.transport import IdleWatch, replica_failure, transport_failure
from dify_serving.manifests import DesiredState
from dify_serving.options import GatewayOptions
from dify_serving.render import (
    index_app_name,
    model_app_name,
    render_serve_config,
)
from dify_serving.specs import DifyIndex, DifyModel, Phase, Task
from dify_serving.status import index_status, model_status
from dify_serving.store import LocalStateStore
from dify_serving.store.kubernetes import KubernetesModelStore, KubernetesUnavailable

T = TypeVar("T")

log = logging.getLogger("dify_serving.gateway")

_SERVING = {Phase.READY.value, Phase.DEGRADED.value}


class GatewayState:
    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.store = LocalStateStore(options.home)
        self.kube = KubernetesModelStore() if options.control == "kubernetes" else None
        self.dashboard = AsyncRayDashboard(options.dashboard_url) if options.dashboard_url else None
        self.statuses: dict[str, dict[str, Any]] = {}
        self.index_statuses: dict[str, dict[str, Any]] = {}
        self.coalescers: dict[str, Any] = {}  # model → EmbedCoalescer (dataplane)
        self.cleaner = Cleaner()  # /v1/data/clean, off the event loop
        self._handles: dict[str, Any] = {}
        self._in_flight = InFlight()  # calls per app, bounded (gateway/inflight.py)
        self._bounds: dict[str, int] = {}  # app key → bound, until the specs may change
        self._streams: dict[str, set[Any]] = defaultdict(set)  # in-flight stream responses
        self._unloaded: set[Any] = set()  # streams cancelled because their model went
        self._refresher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # what readiness reads: the last refresh that worked, why the last one failed
        self.refreshed_at: float | None = None  # time.monotonic()
        self.refresh_failure: str | None = None  # a short reason code
        self._refresh_started = float("-inf")
        self._on_demand: asyncio.Task[None] | None = None
        self.cluster_gpus: float | None = None

    # desired state ---------------------------------------------------------------
    def models(self) -> dict[str, DifyModel]:
        """The desired models: the local store, or DifyModel objects (cached) in a cluster."""
        if self.kube is not None:
            return self.kube.cached()
        return self.store.load()[0].models

    def model(self, name: str | None, task: Task | None = None) -> DifyModel:
        """The model a request names, or the first fitting one the key may use.

        403 when the key may not use it (checked before existence, so a confined key
        learns nothing of other names); 404 when it does not exist.
        """
        models = self.models()
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
                serving = [n for n in fits if self.statuses.get(n, {}).get("phase") in _SERVING]
                name = next(iter(serving or fits), None)
            if name is None:
                raise ApiError(
                    404, "no model named and no default model is loaded", "model_not_found"
                )
        access.check_model(name)
        model = models.get(name)
        if model is None:
            raise ApiError(404, f"model {name!r} is not loaded", "model_not_found")
        return model

    def indexes(self) -> dict[str, DifyIndex]:
        if self.kube is not None:
            return self.kube.cached_indexes()
        return self.store.load()[0].indexes

    def index(self, name: str) -> DifyIndex:
        """The index a request names; 403 when the key may not use it, else 404 if absent."""
        access.check_index(name)
        index = self.indexes().get(name)
        if index is None:
            raise ApiError(404, f"index {name!r} does not exist", "index_not_found")
        return index

    # status ------------------------------------------------------------------------
    def start(self) -> None:
        if self._refresher is None and (self.dashboard or self.kube) is not None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    def close(self) -> None:
        """Stop the status refresh and the cleaning process (the replica is going)."""
        if self._refresher is not None:
            self._refresher.cancel()
        self.cleaner.close()

    @property
    def refreshing(self) -> bool:
        """Whether the background refresh loop runs (it does in a Serve replica)."""
        return self._refresher is not None and not self._refresher.done()

    def refresh_soon(self) -> None:
        """Wake the refresh loop now (after a change, or to see an outage sooner)."""
        self._wake.set()

    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # recorded and logged; keep refreshing
                await self.refresh_status()
            busy = any(s["phase"] not in _SERVING for s in self.statuses.values())
            with contextlib.suppress(TimeoutError):
                idle = 2.0 if self.kube is not None else 5.0
                await asyncio.wait_for(self._wake.wait(), 0.5 if busy else idle)
            self._wake.clear()

    async def refresh_if_older(self, age_s: float) -> None:
        """Refresh unless one started within `age_s`; callers meanwhile share one refresh."""
        task = self._on_demand
        if task is None or task.done():
            if time.monotonic() - self._refresh_started < age_s:
                return
            task = self._on_demand = asyncio.get_running_loop().create_task(self._refresh_quietly())
        await asyncio.shield(task)

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(Exception):  # recorded in refresh_failure
            await self.refresh_status()

    async def refresh_status(self) -> dict[str, dict[str, Any]]:
        """Read Serve's status now; records when it worked or why it did not."""
        self._refresh_started = time.monotonic()
        try:
            statuses = await self._read_status()
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

    async def _read_status(self) -> dict[str, dict[str, Any]]:
        if self.kube is not None:
            try:
                await self.kube.refresh()
            except KubernetesUnavailable as exc:
                log.warning("%s", exc)
        if self.dashboard is None:
            return self.statuses
        apps = (await self.dashboard.get_applications()).get("applications") or {}
        if self.cluster_gpus is None:
            import ray

            self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        models = self.models()
        self._bounds = {}  # the specs may have changed: bounds are worked out again
        self.statuses = {
            name: model_status(name, m.spec, apps, self.cluster_gpus) for name, m in models.items()
        }
        self.index_statuses = {
            name: index_status(name, i.spec, models, apps) for name, i in self.indexes().items()
        }
        return self.statuses

    def require_serving(self, name: str, kind: str = "model") -> None:
        statuses = self.statuses if kind == "model" else self.index_statuses
        status = statuses.get(name)
        if status is None or status["phase"] in _SERVING:
            return  # unknown yet: let the handle decide
        phase = status["phase"]
        if phase != Phase.FAILED.value and status.get("ready_replicas", 0) > 0:
            return  # an app being updated keeps answering from its running replicas
        message = self._shown_message(name, kind, status.get("message"))
        if phase == Phase.FAILED.value:
            raise ApiError(503, f"{kind} {name!r} failed to load: {message}", f"{kind}_failed")
        raise ApiError(
            503,
            f"{kind} {name!r} is {phase.lower()} ({message}); retry shortly",
            f"{kind}_not_ready",
            headers={"Retry-After": "2"},
        )

    def _shown_message(self, name: str, kind: str, message: str | None) -> str | None:
        """A status message without the local weights path this key may not see."""
        if kind == "index":
            index = self.indexes().get(name)
            name = index.spec.embedding_model if index is not None else ""
        model = self.models().get(name)
        return message if model is None else access.without_path(message, model.spec.model_id)

    # calls into model and index replicas ---------------------------------------------
    def handle(self, name: str, kind: str = "model") -> Any:
        app = model_app_name(name) if kind == "model" else index_app_name(name)
        handle = self._handles.get(app)
        if handle is None:
            try:
                handle = serve.get_app_handle(app)
            except Exception as exc:
                raise ApiError(
                    503,
                    f"{kind} {name!r} is not running yet",
                    f"{kind}_not_ready",
                    headers={"Retry-After": "2"},
                ) from exc
            self._handles[app] = handle
        return handle

    def _take(self, name: str, kind: str) -> str:
        """Count a call to `name` against its bound (503 overloaded past it); its key."""
        key = f"{kind}/{name}"
        bound = self._bounds.get(key)
        if bound is None:
            model = self.models().get(name) if kind == "model" else None
            bound = self._bounds[key] = model_bound(model.spec) if model else INDEX_BOUND
        self._in_flight.take(key, bound)
        return key

    async def call(self, name: str, method: str, *args: Any, kind: str = "model") -> Any:
        """Call a replica; bounded in time (a deleted app's handle can otherwise hang)
        and in number (`inflight.py`)."""
        self.require_serving(name, kind)
        note(**{kind: name})
        key = self._take(name, kind)
        try:
            return await asyncio.wait_for(
                getattr(self.handle(name, kind), method).remote(*args),
                self.options.request_timeout_s,
            )
        except (RayTaskError, EngineError) as exc:
            raise replica_failure(exc, kind, name) from None
        except TimeoutError:
            self._forget(name, kind)
            raise ApiError(
                504,
                f"{kind} {name!r} did not answer within {self.options.request_timeout_s}s",
                "timeout",
            ) from None
        except ApiError:
            raise
        except Exception as exc:  # replica gone (unloaded, crashed), Serve down, too large
            error = transport_failure(exc, kind, name)
            if error.code == f"{kind}_unavailable":
                self._forget(name, kind)
            raise error from None
        finally:
            self._in_flight.give_back(key)

    async def info(self, name: str, kind: str = "model") -> dict[str, Any]:
        """The replica's `info()` when it is serving, else {} (never an error, ≤ 5 s)."""
        statuses = self.statuses if kind == "model" else self.index_statuses
        if statuses.get(name, {}).get("phase") not in _SERVING:
            return {}
        try:
            info: dict[str, Any] = await asyncio.wait_for(self.call(name, "info", kind=kind), 5)
            return info
        except Exception:
            return {}

    async def call_index(self, name: str, method: str, *args: Any) -> Any:
        return await self.call(name, method, *args, kind="index")

    def _forget(self, name: str, kind: str) -> None:
        self._handles.pop(model_app_name(name) if kind == "model" else index_app_name(name), None)
        self._bounds.pop(f"{kind}/{name}", None)

    async def stream(self, name: str, method: str, *args: Any) -> AsyncIterator[dict[str, Any]]:
        """Stream from a replica; ends with an EngineError if the model is unloaded, or
        sends nothing for `limits.stream_idle_timeout_s` (the replica call is cancelled)."""
        self.require_serving(name)
        note(model=name)
        key = self._take(name, "model")
        try:
            response = getattr(self.handle(name).options(stream=True), method).remote(*args)
        except BaseException:
            self._in_flight.give_back(key)
            raise
        self._streams[name].add(response)
        loop = asyncio.get_running_loop()
        watch = IdleWatch(loop, self.options.limits.stream_idle_timeout_s, response)
        try:
            async for item in response:
                watch.last = loop.time()
                yield item
                watch.last = loop.time()  # the client's own pace is not the model's silence
            if watch.fired:  # cancelled between two items: the generator just ends
                raise EngineError(504, "stream_idle_timeout", self._idle_message(name))
        except (RayTaskError, EngineError) as exc:
            raise replica_failure(exc, "model", name) from None
        except (Exception, asyncio.CancelledError) as exc:
            if response in self._unloaded:  # we cancelled it: the model was unloaded
                raise EngineError(503, "model_unloaded", f"model {name!r} was unloaded") from None
            if watch.fired:
                raise EngineError(504, "stream_idle_timeout", self._idle_message(name)) from None
            if isinstance(exc, asyncio.CancelledError):  # the client went away
                raise
            error = transport_failure(exc, "model", name)
            if error.code == "model_unavailable":  # the replica died (crashed, deleted)
                self._forget(name, "model")
            raise EngineError(error.status, error.code, error.message) from None
        finally:
            self._in_flight.give_back(key)
            watch.stop()
            self._streams[name].discard(response)
            self._unloaded.discard(response)
            response.cancel()

    def _idle_message(self, name: str) -> str:
        idle = self.options.limits.stream_idle_timeout_s
        return (
            f"model {name!r} sent nothing for {idle:g}s (DIFY_MIRROR_STREAM_IDLE_TIMEOUT_S); "
            "the stream was ended"
        )

    # load / unload -----------------------------------------------------------------
    async def apply(self, state: DesiredState) -> None:
        if self.dashboard is None:
            raise ApiError(503, "this gateway has no Ray dashboard to apply changes", "no_control")
        _, options = self.store.load()
        try:
            await self.dashboard.put_applications(render_serve_config(state, options))
        except RayUnavailable as exc:
            log.warning("applying the Serve config failed: %s", exc)
            raise _unreachable("Ray Serve", "ray_unavailable", " to apply the change") from None
        self.refresh_soon()

    async def load(self, model: DifyModel) -> None:
        """Local: store + apply. Cluster: write the DifyModel; the operator applies it."""
        self._forget(model.name, "model")
        if self.kube is not None:
            await self._kube(self.kube.put(model))
            self.statuses[model.name] = {
                **model_status(model.name, model.spec, {}),
                "phase": Phase.PENDING.value,
            }
            return

        def change(state: DesiredState, _: Any) -> None:
            state.models[model.name] = model

        state, _ = await asyncio.to_thread(self.store.update, change)
        self.statuses[model.name] = model_status(model.name, model.spec, {}, self.cluster_gpus)
        self.statuses[model.name]["phase"] = Phase.LOADING.value
        await self.apply(state)

    async def unload(self, name: str) -> None:
        if self.kube is not None:
            if not await self._kube(self.kube.delete(name)):
                raise ApiError(404, f"model {name!r} is not loaded", "model_not_found")
            self._end_streams(name)
            return
        if name not in self.models():
            raise ApiError(404, f"model {name!r} is not loaded", "model_not_found")

        def change(state: DesiredState, _: Any) -> None:
            state.models.pop(name, None)

        state, _ = await asyncio.to_thread(self.store.update, change)
        self._end_streams(name)
        await self.apply(state)

    def _end_streams(self, name: str) -> None:
        for response in self._streams.pop(name, set()):
            self._unloaded.add(response)
            response.cancel()
        self._forget(name, "model")
        self.statuses.pop(name, None)

    async def _kube(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except KubernetesUnavailable as exc:
            log.warning("Kubernetes API call failed: %s", exc)
            raise _unreachable("the Kubernetes API", "kubernetes_unavailable") from None


def _unreachable(what: str, code: str, purpose: str = "") -> ApiError:
    """A control plane is down: a fixed text (its address and error are in the log)."""
    message = f"{what} cannot be reached{purpose}; retry shortly"
    return ApiError(503, message, code, headers={"Retry-After": "2"})
