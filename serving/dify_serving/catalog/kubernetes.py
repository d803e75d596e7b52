"""The catalog in a cluster: DifyModel and DifyIndex objects in the Kubernetes API.

In a cluster, `POST /v1/models/load` and `/unload` create and delete `DifyModel` objects,
`POST /v1/indexes` and `DELETE /v1/indexes/{name}` `DifyIndex` objects, and the operator
does the rest (its finalizer removes the app, then the vectors of a `reclaimPolicy:
Delete` index), so Kubernetes stays the source of truth. The gateway needs only
`get/list/create/update/delete` on `difymodels` and `difyindexes` in its namespace (the
chart's Role). Plain HTTP against the API server: no client library in the serving image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx

from dify_serving.catalog import IndexExists, IndexRemoval, Unreachable
from dify_serving.kube import InvalidName, KubernetesUnavailable, cluster_access
from dify_serving.specs import API_VERSION, GROUP, VERSION, DifyIndex, DifyModel, Phase, is_name

T = TypeVar("T")
log = logging.getLogger(__name__)


class KubernetesModelStore:
    def __init__(
        self,
        api: str | None = None,
        token: str | None = None,
        namespace: str | None = None,
        verify: str | bool | None = None,
        cache_s: float = 2.0,
    ) -> None:
        access = cluster_access(api, token, namespace, verify)
        self.api, self.namespace = access.api, access.namespace
        self._client = httpx.AsyncClient(timeout=10, headers=access.headers(), verify=access.verify)
        self.cache_s = cache_s
        self._cache: dict[str, DifyModel] = {}
        self._indexes: dict[str, DifyIndex] = {}
        self._stamp = 0.0

    @property
    def _collection(self) -> str:
        return f"{self.api}/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/difymodels"

    @property
    def _index_collection(self) -> str:
        return self._collection.replace("/difymodels", "/difyindexes")

    def _object(self, name: str, collection: str | None = None) -> str:
        """The URL of one object; only a valid name ever becomes part of an API path."""
        if not is_name(name):
            raise InvalidName(f"{name[:80]!r} is not a lower-case RFC 1123 name")
        return f"{collection or self._collection}/{name}"

    def _manifest(self, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The object `POST`ed to create a `kind` named `name` in this namespace."""
        return {
            "apiVersion": API_VERSION,
            "kind": kind,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise KubernetesUnavailable(f"Kubernetes API unreachable: {exc}") from exc

    def cached(self) -> dict[str, DifyModel]:
        return self._cache

    def cached_indexes(self) -> dict[str, DifyIndex]:
        return self._indexes

    async def refresh(self, force: bool = False) -> dict[str, DifyModel]:
        """List DifyModels (valid ones; the operator reports invalid ones in status)."""
        if not force and time.monotonic() - self._stamp < self.cache_s:
            return self._cache
        response = await self._call("GET", self._collection)
        if response.status_code != 200:
            raise KubernetesUnavailable(f"listing difymodels: HTTP {response.status_code}")
        models = _valid(response.json().get("items", []), DifyModel)
        response = await self._call("GET", self._index_collection)
        if response.status_code == 200:  # a gateway without index rights still serves models
            self._indexes = _valid(response.json().get("items", []), DifyIndex)
        self._cache, self._stamp = models, time.monotonic()
        return models

    async def put(self, model: DifyModel) -> None:
        """Create the object, or replace its spec when it exists."""
        url = self._object(model.name)
        body = self._manifest("DifyModel", model.name, model.spec.wire())
        response = await self._call("POST", self._collection, json=body)
        if response.status_code == 409:
            response = await self._call(
                "PATCH",
                url,
                json={"spec": model.spec.wire()},
                headers={"Content-Type": "application/merge-patch+json"},
            )
        if response.status_code >= 300:
            raise KubernetesUnavailable(
                f"writing DifyModel {model.name}: HTTP {response.status_code} {response.text[:200]}"
            )
        self._cache = {**self._cache, model.name: model}

    async def _delete(self, kind: str, name: str, collection: str) -> httpx.Response | None:
        """DELETE one object; None when it did not exist (or cannot, by its name)."""
        try:
            url = self._object(name, collection)
        except InvalidName:
            return None
        response = await self._call("DELETE", url)
        if response.status_code == 404:
            return None
        if response.status_code >= 300:
            raise KubernetesUnavailable(f"deleting {kind} {name}: HTTP {response.status_code}")
        return response

    async def delete(self, name: str) -> bool:
        """Delete the object; False when it did not exist (or cannot, by its name)."""
        if await self._delete("DifyModel", name, self._collection) is None:
            return False
        self._cache = {k: v for k, v in self._cache.items() if k != name}
        return True

    async def create_index(self, index: DifyIndex) -> None:
        """Create the DifyIndex; IndexExists when one by that name exists or is terminating."""
        self._object(index.name)  # refuses a name that is not one
        body = self._manifest("DifyIndex", index.name, index.spec.wire())
        response = await self._call("POST", self._index_collection, json=body)
        if response.status_code == 409:
            raise IndexExists(index.name)
        if response.status_code >= 300:
            raise KubernetesUnavailable(
                f"creating DifyIndex {index.name}: HTTP {response.status_code} "
                f"{response.text[:200]}"
            )
        self._indexes = {**self._indexes, index.name: index}

    async def delete_index(self, name: str) -> dict[str, Any] | None:
        """Delete the DifyIndex; what the API answered (the object, with its finalizers,
        or a Status), or None when there was none by that name."""
        response = await self._delete("DifyIndex", name, self._index_collection)
        if response is None:
            return None
        self._indexes = {k: v for k, v in self._indexes.items() if k != name}
        answer: dict[str, Any] = response.json()
        return answer


def _valid(items: list[dict[str, Any]], kind: Any) -> dict[str, Any]:
    """Living, valid objects by name (the operator reports invalid ones in their status)."""
    out = {}
    for item in items:
        if item.get("metadata", {}).get("deletionTimestamp"):
            continue
        try:
            obj = kind.model_validate({**item, "apiVersion": API_VERSION, "kind": kind.__name__})
        except ValueError:
            continue
        out[obj.name] = obj
    return out


class KubernetesCatalog:
    """The catalog in a cluster: DifyModel/DifyIndex objects; the operator applies them."""

    idle_refresh_s = 2.0

    def __init__(self, store: KubernetesModelStore | None = None) -> None:
        self.store = store or KubernetesModelStore()

    def models(self) -> dict[str, DifyModel]:
        return self.store.cached()

    def indexes(self) -> dict[str, DifyIndex]:
        return self.store.cached_indexes()

    async def refresh(self) -> None:
        try:
            await self.store.refresh()
        except KubernetesUnavailable as exc:  # keep serving what was listed last
            log.warning("%s", exc)

    async def put_model(self, model: DifyModel) -> Phase:
        await self._call(self.store.put(model))
        return Phase.PENDING

    async def delete_model(self, name: str) -> bool:
        return await self._call(self.store.delete(name))

    async def create_index(self, index: DifyIndex) -> Phase:
        await self._call(self.store.create_index(index))
        return Phase.PENDING

    async def delete_index(self, name: str) -> IndexRemoval | None:
        known = self.store.cached_indexes().get(name)
        answer = await self._call(self.store.delete_index(name))
        if answer is None:
            return None
        is_object = answer.get("kind") == "DifyIndex"
        spec = answer.get("spec") if is_object else None
        policy = (spec or {}).get("reclaimPolicy") or (
            known.spec.reclaim_policy if known else "Retain"
        )
        if not (is_object and answer.get("metadata", {}).get("finalizers")):
            # gone at once: no operator held it, so nothing ran and nothing was reclaimed
            message = "deleted; no operator finalizer held it, so its vectors were not touched"
            return IndexRemoval(policy, "retained", message, done=True)
        if policy == "Delete":
            message = "the operator removes its replica, then its vectors (reclaimPolicy: Delete)"
            return IndexRemoval("Delete", "deleting", message, done=False)
        message = "the operator removes its replica; the vectors are kept (reclaimPolicy: Retain)"
        return IndexRemoval("Retain", "retained", message, done=False)

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except KubernetesUnavailable as exc:
            log.warning("Kubernetes API call failed: %s", exc)
            raise Unreachable("the Kubernetes API", "kubernetes_unavailable") from None
