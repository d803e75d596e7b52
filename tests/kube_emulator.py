"""
A Kubernetes API for tests: kmock's emulator made realistic enough for kopf.

Pieces (all importable; the `kube` fixture is in tests/operator/conftest.py):

* ``RealisticEmulator`` -- kmock.KubernetesEmulator + what kopf>=1.44 needs:
  metadata.resourceVersion bumped on every write, generation/uid/
  creationTimestamp, generateName (kopf's events), status-subresource
  semantics, 422 on failed JSON-patch ``test`` ops, 409 on stale merge-patches.
* ``start_emulator()`` -- async context manager: emulator on a free port with
  kmock's bundled builtin resources + our CRDs + kopf's peering CRDs.
* ``KubeClient`` -- tiny aiohttp client (create/get/patch/delete/list/wait_for).
* ``OperatorThread`` -- runs ``kopf.operator(...)`` in its own thread & event loop,
  logging in via ``@kopf.on.login``; ``await op.stop()`` stops it cleanly.
* ``start_operator()`` -- ``dify_operator`` itself (the global registry) in such a
  thread; ``model()``, ``index()`` and ``condition()`` write and read its resources.

Why a thread per operator (and not an asyncio task in the test's loop):
``kopf.operator()`` -> ``run_tasks()`` cancels *every task created in the loop
after the operator started* when it exits -- including kmock's own aiohttp
server request tasks and a second operator's tasks. A private loop per
operator isolates that. It also keeps kopf's SIGINT/SIGTERM handlers off
pytest's main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
import pathlib
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
import attrs
import jsonpatch
import jsonpointer
import kmock
import kopf
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing as kmock_parsing

if TYPE_CHECKING:
    from dify_operator.settings import OperatorSettings

CRD_DIR = pathlib.Path(__file__).resolve().parents[1] / "crds"
CRD_FILES = [CRD_DIR / "difymodels.yaml", CRD_DIR / "difyindexes.yaml"]

GROUP = "difymirror.dev"
VERSION = "v1alpha1"
DIFYMODELS = f"{GROUP}/{VERSION}/difymodels"
DIFYINDEXES = f"{GROUP}/{VERSION}/difyindexes"
PEERINGS = "kopf.dev/v1/kopfpeerings"
CLUSTER_PEERINGS = "kopf.dev/v1/clusterkopfpeerings"
EVENTS = "v1/events"

ALL_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}

logger = logging.getLogger("harness")


# --------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class RealisticEmulator(kmock.KubernetesEmulator):
    """
    kmock.KubernetesEmulator which maintains server-side metadata like a real API server.

    kmock stores writes verbatim; kopf>=1.44 JSON-patches finalizers with
    ``{"op": "test", "path": "/metadata/resourceVersion", ...}`` and waits for the
    patched resourceVersion to arrive via the watch-stream, so it must exist & change.

    All writes are serialized by our own lock; the patch is pre-computed here
    (so the resulting metadata is exact) and handed to kmock as a whole-object
    JSON-patch ``replace ""``, so kmock's own bookkeeping (history, watch-events,
    finalizer-driven garbage collection) keeps working unchanged.
    """

    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _last_rv: int = attrs.field(default=999, init=False)

    def next_rv(self) -> str:
        self._last_rv += 1
        return str(self._last_rv)

    # ---- reads: list & watch with resourceVersion semantics -------------------------------------
    # kmock 0.8 lists with resourceVersion '...' and every watch re-sends ALL objects as ADDED,
    # ignoring ?resourceVersion=. kopf then processes a stale body after its own patch, gets a 422
    # on its finalizer JSON-patch, keeps the no-op remainder and never re-runs: the object hangs
    # with a finalizer but no handler ever called. So: list returns the real current version, and
    # a watch since version N replays only objects changed after N (then streams live events).

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(self._last_rv)
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""  # flush the headers (as kmock does)
        since_raw = request.params.get("resourceVersion")
        since = int(since_raw) if since_raw and since_raw.isdigit() and since_raw != "0" else None
        bus = self._buses[request.resource]
        marker = await bus.mark()  # mark BEFORE the snapshot: nothing is lost in between
        try:
            # Writes hold _write_lock from version assignment until their events are on the bus,
            # so under it the snapshot and snapshot_rv are consistent with each other.
            async with self._write_lock, self._lock:
                snapshot_rv = self._last_rv
                snapshot = [
                    obj.raw
                    for (res, ns, name), obj in self.objects.items()
                    if res == request.resource
                    and not obj.deleted
                    and self._watch_matches(request, ns, name)
                ]
            for raw in snapshot:
                rv = _rv_int(raw)
                if since is None or rv is None or rv > since:
                    yield {"type": "ADDED" if since is None else "MODIFIED", "object": raw}
            async for event in bus.stream(since=marker):
                obj = event.get("object", {})
                meta = obj.get("metadata", {})
                if not self._watch_matches(request, meta.get("namespace"), meta.get("name")):
                    continue
                rv = _rv_int(obj)
                if rv is not None and rv <= snapshot_rv:
                    continue  # already reflected in the snapshot
                yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _watch_matches(request: kmock.Request, namespace: str | None, name: str | None) -> bool:
        return (request.namespace is None or namespace == request.namespace) and (
            request.name is None or name == request.name
        )

    def _has_status_subresource(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    async def _handle(self, request: kmock.Request) -> Any:
        writes = {kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE}
        if request.resource is None or request.action not in writes:
            return await super()._handle(request)
        async with self._write_lock:
            if request.action == kmock.action.CREATE:
                request = self._prepare_create(request)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                request = self._prepare_update(request)
            elif request.action == kmock.action.DELETE and request.name is not None:
                self._prepare_delete(request)
            return await super()._handle(request)

    def _prepare_create(self, request: kmock.Request) -> kmock.Request:
        if not isinstance(request.data, dict):
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message="Body must be a JSON object."
            )
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if meta.get(
                "generateName"
            ):  # kopf posts its k8s-events with generateName='kopf-event-'
                meta["name"] = meta["generateName"] + secrets.token_hex(3)
            else:
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message="metadata.name is required."
                )
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self.next_rv()
        meta["generation"] = 1
        meta.setdefault("creationTimestamp", _now())
        meta.pop("deletionTimestamp", None)
        if self._has_status_subresource(request.resource):
            obj.pop("status", None)  # as a real API server: status is ignored on create
        return _with_data(request, obj)

    def _prepare_update(self, request: kmock.Request) -> kmock.Request:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return request  # kmock itself answers 404
        old: dict[str, Any] = copy.deepcopy(self.objects[key].raw)
        patch = request.data
        try:
            if isinstance(patch, dict):  # merge-patch (kopf, kubectl --type=merge)
                expected_rv = (patch.get("metadata") or {}).get("resourceVersion")
                if expected_rv is not None and expected_rv != old.get("metadata", {}).get(
                    "resourceVersion"
                ):
                    raise kmock.KubernetesError(
                        status=409, reason="Conflict", message="resourceVersion mismatch"
                    )
                new = dict(kmock_dicts.merge_patch_dict(old, patch))
            elif isinstance(patch, list):  # JSON-patch (kopf: finalizers with a 'test' op)
                new = jsonpatch.apply_patch(old, patch, in_place=False)
            else:
                raise kmock.KubernetesError(
                    status=400, reason="BadRequest", message="Unsupported patch."
                )
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            # A real API server answers 422 on failed 'test' ops; kopf relies on that
            # (APIUnprocessableEntityError -> retry the finalizer patch on the next cycle).
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e))
        new = copy.deepcopy(new)

        # Status-subresource semantics: /status writes touch only .status; the main endpoint ignores .status.
        if self._has_status_subresource(request.resource):
            if request.subresource == "status":
                fixed = copy.deepcopy(old)
                if "status" in new:
                    fixed["status"] = new["status"]
                else:
                    fixed.pop("status", None)
                new = fixed
            else:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)

        # Server-owned metadata: immutable identity, bumped versions.
        meta = new.setdefault("metadata", {})
        old_meta = old.get("metadata", {})
        for field in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp"):
            if field in old_meta:
                meta[field] = old_meta[field]
        if _essence(new, self._has_status_subresource(request.resource)) != _essence(
            old, self._has_status_subresource(request.resource)
        ):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        else:
            meta["generation"] = old_meta.get("generation", 1)
        if new != old:  # no-op patches keep the version (like the real API server)
            meta["resourceVersion"] = self.next_rv()
        else:
            meta["resourceVersion"] = old_meta.get("resourceVersion")
        if meta.get("finalizers") == []:
            del meta["finalizers"]  # as K8s does; kmock then garbage-collects if being deleted
        return _with_data(request, [{"op": "replace", "path": "", "value": new}])

    def _prepare_delete(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # kmock itself answers 404
        meta = self.objects[key].get("metadata", {})
        if meta.get("deletionTimestamp"):
            return  # already being deleted; kmock does nothing
        # kmock will either add deletionTimestamp (finalizers present) or drop the object;
        # either way the resulting watch-event must carry a fresh resourceVersion.
        bump: dict[str, Any] = {"resourceVersion": self.next_rv()}
        if meta.get("finalizers"):
            bump["generation"] = (
                int(meta.get("generation", 1)) + 1
            )  # as K8s does on graceful deletion
        self.objects[key].patch({"metadata": bump})  # no event here; kmock emits it right after


def _rv_int(raw: dict[str, Any]) -> int | None:
    rv = (raw.get("metadata") or {}).get("resourceVersion")
    return int(rv) if isinstance(rv, str) and rv.isdigit() else None


def _with_data(request: kmock.Request, data: Any) -> kmock.Request:
    # kmock matches reactions to requests BY IDENTITY (the request must be the very object recorded
    # in kmock.requests), so attrs.evolve() would not be served. Rewrite the frozen field in place.
    # NB: kmock.requests[i].data then shows the effective (rewritten) write, .body/.text the original.
    object.__setattr__(request, "data", data)
    return request


def _essence(obj: dict[str, Any], status_is_subresource: bool) -> dict[str, Any]:
    # What bumps metadata.generation: anything but metadata (and status if it is a subresource).
    return {
        k: v
        for k, v in obj.items()
        if k != "metadata" and not (status_is_subresource and k == "status")
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fixed_parse_path(path: str) -> kmock_parsing.ParsedPath:
    """kmock 0.8 crashes on ``/api/v1/namespaces`` and mis-parses ``/api/v1/namespaces/NAME``."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "api" and parts[2] == "namespaces":
        rest = parts[3:]
        if len(rest) == 0:
            return kmock_parsing.ParsedPath("", parts[1], "namespaces", None, None, None)
        if len(rest) == 1 or (len(rest) == 2 and rest[1] in ("status", "finalize")):
            return kmock_parsing.ParsedPath(
                "", parts[1], "namespaces", None, rest[0], rest[1] if len(rest) == 2 else None
            )
    return _orig_parse_path(path)


_orig_parse_path = kmock_parsing.parse_path


@contextlib.contextmanager
def _patched_namespace_parsing():
    kmock_parsing.parse_path = _fixed_parse_path
    try:
        yield
    finally:
        kmock_parsing.parse_path = _orig_parse_path


def register_crd(emulator: kmock.KubernetesEmulator, path: pathlib.Path) -> list[str]:
    """Register every served version of a CRD YAML as a discoverable resource."""
    crd = yaml.safe_load(path.read_text())
    spec = crd["spec"]
    names = spec["names"]
    keys = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        key = f"{spec['group']}/{version['name']}/{names['plural']}"
        emulator.resources[key] = kmock.ResourceInfo(
            kind=names["kind"],
            singular=names.get("singular", names["kind"].lower()),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            verbs=ALL_VERBS,
            shortnames=set(names.get("shortNames", [])),
            categories=set(names.get("categories", [])),
            subresources=set((version.get("subresources") or {}).keys()),
        )
        keys.append(key)
    return keys


def register_kopf_peering(emulator: kmock.KubernetesEmulator) -> None:
    # kopf's own peering CRDs (https://kopf.readthedocs.io/en/stable/peering/): no status subresource.
    emulator.resources[PEERINGS] = kmock.ResourceInfo(
        kind="KopfPeering", singular="kopfpeering", namespaced=True, verbs=ALL_VERBS
    )
    emulator.resources[CLUSTER_PEERINGS] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", singular="clusterkopfpeering", namespaced=False, verbs=ALL_VERBS
    )


@contextlib.asynccontextmanager
async def start_emulator(
    crd_files: Iterable[pathlib.Path] = CRD_FILES,
    namespaces: Iterable[str] = ("default",),
) -> AsyncIterator[RealisticEmulator]:
    """Start the emulator on a free 127.0.0.1 port (port=None -> OS-assigned)."""
    with _patched_namespace_parsing():
        emulator = RealisticEmulator()
        emulator.resources.load_bundled()  # builtins: v1 (namespaces, events, ...), apps, batch, *.k8s.io
        for path in crd_files:
            register_crd(emulator, path)
        register_kopf_peering(emulator)
        async with emulator, kmock.Server(emulator):
            for ns in namespaces:
                await emulator.post("/api/v1/namespaces", json={"metadata": {"name": ns}})
            yield emulator


# --------------------------------------------------------------------------------------
# A small client
# --------------------------------------------------------------------------------------


class KubeClient:
    """Minimal async client: ``resource`` is 'group/version/plural' or 'v1/plural'."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    def url(
        self,
        resource: str,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        parts = resource.split("/")
        group, version, plural = ("", parts[0], parts[1]) if len(parts) == 2 else parts
        url = (
            f"{self.base_url}/api/{version}"
            if not group
            else f"{self.base_url}/apis/{group}/{version}"
        )
        if namespace:
            url += f"/namespaces/{namespace}"
        url += f"/{plural}"
        if name:
            url += f"/{name}"
        if subresource:
            url += f"/{subresource}"
        return url

    async def _json(self, rsp: aiohttp.ClientResponse) -> dict[str, Any]:
        data = await rsp.json(content_type=None)
        if rsp.status >= 400:
            raise ApiError(rsp.status, data)
        return data

    async def create(
        self, resource: str, body: dict[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        namespace = namespace or body.get("metadata", {}).get("namespace")
        async with self.session.post(self.url(resource, namespace), json=body) as rsp:
            return await self._json(rsp)

    async def get(
        self, resource: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        async with self.session.get(self.url(resource, namespace, name)) as rsp:
            if rsp.status == 404:
                return None
            return await self._json(rsp)

    async def list(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        async with self.session.get(self.url(resource, namespace)) as rsp:
            return (await self._json(rsp))["items"]

    async def patch(
        self,
        resource: str,
        name: str,
        patch: dict[str, Any] | list[dict[str, Any]],
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        ctype = (
            "application/json-patch+json"
            if isinstance(patch, list)
            else "application/merge-patch+json"
        )
        async with self.session.patch(
            self.url(resource, namespace, name, subresource),
            json=patch,
            headers={"Content-Type": ctype},
        ) as rsp:
            return await self._json(rsp)

    async def delete(
        self, resource: str, name: str, namespace: str | None = None
    ) -> dict[str, Any]:
        async with self.session.delete(self.url(resource, namespace, name)) as rsp:
            return await self._json(rsp)

    async def wait_for(
        self,
        fn: Callable[[], Any],
        *,
        timeout: float = 60,
        interval: float = 0.1,
        what: str = "condition",
    ) -> Any:
        """Poll ``fn`` (sync or async) until it returns a truthy value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            if loop.time() > deadline:
                raise TimeoutError(f"Timed out after {timeout}s waiting for {what}.")
            await asyncio.sleep(interval)

    async def events_for(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return [
            e
            for e in await self.list(EVENTS, namespace)
            if e.get("involvedObject", {}).get("name") == name
        ]


class ApiError(Exception):
    def __init__(self, status: int, data: Any) -> None:
        super().__init__(
            f"HTTP {status}: {data.get('message') if isinstance(data, dict) else data}"
        )
        self.status = status
        self.data = data


# --------------------------------------------------------------------------------------
# The operator runner
# --------------------------------------------------------------------------------------


def make_settings(**overrides: Any) -> kopf.OperatorSettings:
    """Settings that matter against an emulator on a loaded 2-CPU box."""
    settings = kopf.OperatorSettings()
    settings.watching.connect_timeout = 30
    settings.watching.server_timeout = (
        600  # kmock ignores ?timeoutSeconds (watches never end) -- harmless
    )
    settings.watching.client_timeout = None
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 30
    settings.networking.error_backoffs = [0.5, 1, 2]
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.consistency_timeout = 10
    settings.posting.enabled = True
    settings.posting.level = logging.INFO  # kopf.info() and up become v1/events
    settings.batching.idle_timeout = 5
    settings.batching.exit_timeout = 5
    settings.peering.lifetime = 60
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        setattr(getattr(settings, section), field, value)
    return settings


def add_login(registry: kopf.OperatorRegistry, server: str) -> None:
    @kopf.on.login(registry=registry)
    def _login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=server, insecure=True, scheme="Bearer", token="test-token"
        )


class OperatorThread:
    """
    One kopf operator in a daemon thread with its own event loop.

    ``registry`` must be a fresh ``kopf.OperatorRegistry()`` (NOT the global default one, which also
    carries the kubeconfig/in-cluster "piggybacking" login handlers). The login handler is added here.
    """

    def __init__(
        self,
        *,
        registry: kopf.OperatorRegistry,
        server: str,
        settings: kopf.OperatorSettings | None = None,
        **operator_kwargs: Any,
    ) -> None:
        self.registry = registry
        self.settings = settings if settings is not None else make_settings()
        self.operator_kwargs = operator_kwargs
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.exception: BaseException | None = None
        self.thread: threading.Thread | None = None
        add_login(registry, server)

    def _main(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                    **self.operator_kwargs,
                )
            )
        except BaseException as e:  # surfaced in stop()
            self.exception = e

    async def start(self, timeout: float = 60) -> OperatorThread:
        name = f"kopf-{self.operator_kwargs.get('identity') or id(self)}"  # for log records' threadName
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()
        # NB: never block the test's loop: the emulator lives there and must keep answering.
        ok = await asyncio.to_thread(self.ready_flag.wait, timeout)
        if not ok:
            raise TimeoutError(f"kopf operator not ready in {timeout}s: {self.exception!r}")
        return self

    async def stop(self, timeout: float = 60) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        await asyncio.to_thread(
            self.thread.join, timeout
        )  # kopf may still talk to the emulator here
        if self.thread.is_alive():
            raise TimeoutError(f"kopf operator did not stop in {timeout}s")
        self.thread = None
        if self.exception is not None:
            raise self.exception


# --------------------------------------------------------------------------------------
# The dify operator against the emulator, and its resources
# --------------------------------------------------------------------------------------


#: The namespace the resources below are created in.
NS = "default"


def model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"modelId": "builtin:demo-llm", **spec},
    }


def index(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyIndex",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return dict(c)
    return {}


class Operator:
    """Runs `dify_operator` (the global kopf registry) in a thread, against one emulator."""

    url: str | None = None
    _login_added = False

    @classmethod
    def ensure_login(cls) -> None:
        if cls._login_added:
            return

        @kopf.on.login()
        def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
            assert cls.url is not None
            return kopf.ConnectionInfo(server=cls.url, insecure=True, scheme="Bearer", token="t")

        cls._login_added = True


async def start_operator(
    url: str, config: OperatorSettings, peering: tuple[str, str, int] | None = None
) -> OperatorThread:
    """`dify_operator` on the global registry, with `config` as its memo; standalone, or
    one of several peers with `peering`."""
    from dify_operator import handlers  # noqa: F401  (registers the handlers)

    Operator.ensure_login()
    Operator.url = url
    op = OperatorThread.__new__(OperatorThread)
    op.registry = kopf.get_default_registry()
    op.settings = make_settings()
    op.operator_kwargs = {"clusterwide": True, "standalone": True, "memo": kopf.Memo(config=config)}
    if peering:
        name, identity, priority = peering
        op.operator_kwargs |= {
            "standalone": False,
            "peering_name": name,
            "identity": identity,
            "priority": priority,
        }
    op.stop_flag, op.ready_flag = threading.Event(), threading.Event()
    op.exception, op.thread = None, None
    return await op.start()
