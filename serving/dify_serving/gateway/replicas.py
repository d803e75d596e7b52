"""Typed clients over the Serve handles of model and index apps.

Everything about calling a replica lives here, once: the app's readiness (a clear 503
before a call that could only wait), the bound on calls in flight (`inflight.py`), the
time limit (a deleted app's handle can otherwise hang), unwrapping the replica's own
error out of Ray's, mapping transport failures to documented codes (`transport.py`),
dropping a handle whose replica went, and ending streams: when their model is unloaded
or when it sends nothing for `stream_idle_timeout_s`.

`ModelClient` and `IndexClient` differ only in what they call and where their status
and bound come from; the data plane calls nothing else, and the gRPC servicer and the
task worker of later issues use these same clients.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from ray import serve
from ray.exceptions import RayTaskError

from dify_serving.catalog import Catalog
from dify_serving.engines.protocol import (
    EngineError,
)
from dify_serving.errors import DifyError
from dify_serving.gateway import access
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.inflight import INDEX_BOUND, InFlight, model_bound
from dify_serving.gateway.notes import note
from dify_serving.gateway.status_cache import SERVING, StatusCache
from dify_serving.gateway.transport import IdleWatch, replica_failure, transport_failure
from dify_serving.options import GatewayOptions
from dify_serving.render import index_app_name, model_app_name
from dify_serving.specs import Phase

P = ParamSpec("P")
R = TypeVar("R")


class ReplicaClient:
    kind: ClassVar[str]  # "model" or "index": in error codes, messages and audit notes

    def __init__(self, catalog: Catalog, status: StatusCache, options: GatewayOptions) -> None:
        self.catalog = catalog
        self.status = status
        self.timeout_s = options.request_timeout_s
        self._handles: dict[str, Any] = {}
        self._in_flight = InFlight(self.kind)
        self._bounds: dict[str, int] = {}  # until the status cache reads new specs
        self._bounds_read = -1

    # what a subclass says -----------------------------------------------------------------
    def app_name(self, name: str) -> str:
        raise NotImplementedError

    def statuses(self) -> Mapping[str, dict[str, Any]]:
        raise NotImplementedError

    def bound(self, name: str) -> int:
        raise NotImplementedError

    def model_id(self, name: str) -> str | None:
        """The weights a status message may name (blanked for keys that may not see it)."""
        raise NotImplementedError

    # readiness -----------------------------------------------------------------------------
    def require_serving(self, name: str) -> None:
        status = self.statuses().get(name)
        if status is None or status["phase"] in SERVING:
            return  # unknown yet: let the handle decide
        phase = status["phase"]
        if phase != Phase.FAILED.value and status.get("ready_replicas", 0) > 0:
            return  # an app being updated keeps answering from its running replicas
        kind = self.kind
        message = status.get("message")
        model_id = self.model_id(name)
        if model_id is not None:
            message = access.without_path(message, model_id)
        if phase == Phase.FAILED.value:
            raise ApiError(503, f"{kind}_failed", f"{kind} {name!r} failed to load: {message}")
        raise ApiError(
            503,
            f"{kind}_not_ready",
            f"{kind} {name!r} is {phase.lower()} ({message}); retry shortly",
            headers={"Retry-After": "2"},
        )

    def handle(self, name: str) -> Any:
        app = self.app_name(name)
        handle = self._handles.get(app)
        if handle is None:
            try:
                handle = serve.get_app_handle(app)
            except Exception as exc:
                raise ApiError(
                    503,
                    f"{self.kind}_not_ready",
                    f"{self.kind} {name!r} is not running yet",
                    headers={"Retry-After": "2"},
                ) from exc
            self._handles[app] = handle
        return handle

    def forget(self, name: str) -> None:
        """Drop the handle (its replica went) and the bound (the spec may change); for a
        model's name, those of all its versions too."""
        app = self.app_name(name)
        for held in [a for a in self._handles if a == app or a.startswith(f"{app}.")]:
            self._handles.pop(held, None)
        self._bounds.pop(name, None)

    def held(self, name: str) -> int:
        """Calls to `name` in flight from this gateway replica now."""
        return self._in_flight.held(name)

    def _take(self, name: str) -> None:
        """Count a call to `name` against its bound (503 overloaded past it)."""
        if self._bounds_read != self.status.generation:
            self._bounds.clear()
            self._bounds_read = self.status.generation
        bound = self._bounds.get(name)
        if bound is None:
            bound = self._bounds[name] = self.bound(name)
        self._in_flight.take(name, bound)

    # calls ---------------------------------------------------------------------------------
    async def call(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One call to a replica method, bounded in time and in number."""
        self.require_serving(name)
        note(**{self.kind: name})
        self._take(name)
        response = None
        cold = self.kind == "model" and self.status.asleep(name)  # Serve queues it: a wake
        started = time.monotonic()
        try:
            response = getattr(self.handle(name), method).remote(*args, **kwargs)
            result = await asyncio.wait_for(response, self.timeout_s)
            if cold:
                self.status.woke(name, time.monotonic() - started)
            return result
        except asyncio.CancelledError:
            # the caller went away (a client, a cancelled task): so does the replica's work,
            # which frees its batch slot
            if response is not None:
                response.cancel()
            raise
        except (RayTaskError, DifyError) as exc:
            if isinstance(exc, ApiError):
                raise
            raise replica_failure(exc, self.kind, name) from None
        except TimeoutError:
            if response is not None:
                response.cancel()
            self.forget(name)
            raise ApiError(
                504,
                "timeout",
                f"{self.kind} {name!r} did not answer within {self.timeout_s}s",
            ) from None
        except Exception as exc:  # replica gone (unloaded, crashed), Serve down, too large
            error = transport_failure(exc, self.kind, name)
            if error.code == f"{self.kind}_unavailable":
                self.forget(name)
            raise error from None
        finally:
            self._in_flight.give_back(name)

    async def info(self, name: str) -> dict[str, Any]:
        """The replica's `info()` when it is serving, else {} (never an error, ≤ 5 s); a
        model scaled to zero is not woken to be shown."""
        if not self.status.serving(self.statuses(), name) or (
            self.kind == "model" and self.status.asleep(name)
        ):
            return {}
        try:
            info: dict[str, Any] = await asyncio.wait_for(self.call(name, "info"), 5)
            return info
        except Exception:
            return {}


class ModelClient(ReplicaClient):
    kind = "model"

    def __init__(self, catalog: Catalog, status: StatusCache, options: GatewayOptions) -> None:
        super().__init__(catalog, status, options)
        self.stream_idle_s = options.limits.stream_idle_timeout_s
        self._streams: dict[str, set[Any]] = defaultdict(set)  # in-flight stream responses
        self._unloaded: set[Any] = set()  # streams cancelled because their model went

    # A model is called by its target: `name`, or `name@version` for one version of a
    # versioned model (`DifyModel.target`); each version is its own app.
    def app_name(self, name: str) -> str:
        model, _, version = name.partition("@")
        return model_app_name(model, version or None)

    def statuses(self) -> Mapping[str, dict[str, Any]]:
        return self.status.targets

    def bound(self, name: str) -> int:
        model = self.catalog.models().get(name.partition("@")[0])
        return model_bound(model.spec) if model else INDEX_BOUND

    def model_id(self, name: str) -> str | None:
        base, _, version = name.partition("@")
        model = self.catalog.models().get(base)
        if model is None:
            return None
        served = model.spec.version(version) if version else None
        return served.model_id if served is not None else model.spec.model_id

    async def invoke(
        self,
        name: str,
        method: Callable[Concatenate[Any, P], Awaitable[R]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """`method` of a capability Protocol (`Generator.generate`, `Embedder.embed_each`,
        `Predictor.predict`, ...) on the model's replica, typed by the Protocol: a new
        capability needs no method here, and a misspelt method is a type error."""
        result: R = await self.call(name, method.__name__, *args, **kwargs)
        return result

    async def stream(
        self,
        name: str,
        method: Callable[Concatenate[Any, P], AsyncIterator[R]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> AsyncIterator[R]:
        """The items of a streaming capability method (`Generator.generate_stream`); ends
        with an EngineError if the model is unloaded, or sends nothing for
        `stream_idle_timeout_s` (the replica call is cancelled)."""
        self.require_serving(name)
        note(model=name)
        self._take(name)
        cold, started = self.status.asleep(name), time.monotonic()  # a wake: timed to 1st item
        try:
            streaming = self.handle(name).options(stream=True)
            response = getattr(streaming, method.__name__).remote(*args, **kwargs)
        except BaseException:
            self._in_flight.give_back(name)
            raise
        self._streams[name].add(response)
        loop = asyncio.get_running_loop()
        watch = IdleWatch(loop, self.stream_idle_s, response)
        try:
            async for item in response:
                watch.last = loop.time()
                if cold:
                    cold = False
                    self.status.woke(name, time.monotonic() - started)
                yield item
                watch.last = loop.time()  # the client's own pace is not the model's silence
            if watch.fired:  # cancelled between two items: the generator just ends
                raise EngineError(504, "stream_idle_timeout", self._idle_message(name))
        except (RayTaskError, DifyError) as exc:
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
                self.forget(name)
            raise EngineError(error.status, error.code, error.message) from None
        finally:
            self._in_flight.give_back(name)
            watch.stop()
            self._streams[name].discard(response)
            self._unloaded.discard(response)
            response.cancel()

    def _idle_message(self, name: str) -> str:
        return (
            f"model {name!r} sent nothing for {self.stream_idle_s:g}s "
            "(DIFY_MIRROR_STREAM_IDLE_TIMEOUT_S); the stream was ended"
        )

    def end_streams(self, name: str) -> None:
        """The model was unloaded: its streams (all its versions') end with
        `model_unloaded`."""
        for target in [t for t in self._streams if t == name or t.startswith(f"{name}@")]:
            for response in self._streams.pop(target, set()):
                self._unloaded.add(response)
                response.cancel()
        self.forget(name)


class IndexClient(ReplicaClient):
    """Calls to index replicas (`knowledge/deployment.py`), the one writer of each index."""

    kind = "index"

    def app_name(self, name: str) -> str:
        return index_app_name(name)

    def statuses(self) -> Mapping[str, dict[str, Any]]:
        return self.status.indexes

    def bound(self, name: str) -> int:
        return INDEX_BOUND

    def model_id(self, name: str) -> str | None:
        index = self.catalog.indexes().get(name)
        model = self.catalog.models().get(index.spec.embedding_model) if index else None
        return model.spec.model_id if model else None

    async def upsert(self, name: str, documents: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(name, "upsert", documents)
        return result

    async def search(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(name, "search", request)
        return result

    async def delete(
        self, name: str, document_ids: list[str] | None, subject_id: str | None
    ) -> int:
        removed: int = await self.call(name, "delete", document_ids, subject_id)
        return removed

    async def chunk(self, name: str, text: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(name, "chunk", text)
        return result
