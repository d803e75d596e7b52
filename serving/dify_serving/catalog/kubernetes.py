"""The catalog in a cluster: DifyModel objects in the Kubernetes API.

In a cluster, `POST /v1/models/load` and `/unload` create and delete `DifyModel` objects
and the operator does the rest, so Kubernetes stays the source of truth. The gateway
needs only `get/list/create/update/delete` on `difymodels` in its namespace (the chart's
Role). Plain HTTP against the API server: no client library in the serving image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx

from dify_serving.catalog import Unreachable
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

    def _object(self, name: str) -> str:
        """The URL of one DifyModel; only a valid name ever becomes part of an API path."""
        if not is_name(name):
            raise InvalidName(f"{name[:80]!r} is not a lower-case RFC 1123 name")
        return f"{self._collection}/{name}"

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
        response = await self._call("GET", self._collection.replace("difymodels", "difyindexes"))
        if response.status_code == 200:  # a gateway without index rights still serves models
            self._indexes = _valid(response.json().get("items", []), DifyIndex)
        self._cache, self._stamp = models, time.monotonic()
        return models

    async def put(self, model: DifyModel) -> None:
        """Create the object, or replace its spec when it exists."""
        url = self._object(model.name)
        body = {
            "apiVersion": API_VERSION,
            "kind": "DifyModel",
            "metadata": {"name": model.name, "namespace": self.namespace},
            "spec": model.spec.wire(),
        }
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

    async def delete(self, name: str) -> bool:
        """Delete the object; False when it did not exist (or cannot, by its name)."""
        try:
            url = self._object(name)
        except InvalidName:
            return False
        response = await self._call("DELETE", url)
        if response.status_code == 404:
            return False
        if response.status_code >= 300:
            raise KubernetesUnavailable(f"deleting DifyModel {name}: HTTP {response.status_code}")
        self._cache = {k: v for k, v in self._cache.items() if k != name}
        return True


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

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except KubernetesUnavailable as exc:
            log.warning("Kubernetes API call failed: %s", exc)
            raise Unreachable("the Kubernetes API", "kubernetes_unavailable") from None
