"""DifyModel objects in the Kubernetes API as the gateway's desired state (cluster mode).

In a cluster, `POST /v1/models/load` and `/unload` create and delete `DifyModel` objects
and the operator does the rest, so Kubernetes stays the source of truth. The gateway
needs only `get/list/create/update/delete` on `difymodels` in its namespace (the chart's
Role). Plain HTTP against the API server: no client library in the serving image.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dify_serving.specs import API_VERSION, GROUP, VERSION, DifyIndex, DifyModel, is_name

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubernetesUnavailable(RuntimeError):
    pass


class InvalidName(ValueError):
    """A name that must not become part of a Kubernetes API path."""


@dataclass(frozen=True)
class ClusterAccess:
    """How this process reaches its Kubernetes API server."""

    api: str
    namespace: str
    token: str | None = field(default=None, repr=False)
    verify: str | bool = True

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def cluster_access(
    api: str | None = None,
    token: str | None = None,
    namespace: str | None = None,
    verify: str | bool | None = None,
) -> ClusterAccess:
    """The API server, token, namespace and CA of this pod (what is not given).

    In a pod: `KUBERNETES_SERVICE_*` and the mounted service account; elsewhere (tests,
    tools) `DIFY_MIRROR_KUBE_API`, `DIFY_MIRROR_KUBE_TOKEN` and `DIFY_MIRROR_NAMESPACE`.
    The namespace becomes part of API paths, so it must be an RFC 1123 label (else
    InvalidName). Raises KubernetesUnavailable when no API server is known.
    """
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    found = (
        api or os.environ.get("DIFY_MIRROR_KUBE_API") or (f"https://{host}:{port}" if host else "")
    ).rstrip("/")
    if not found:
        raise KubernetesUnavailable(
            "no Kubernetes API: not in a pod, and DIFY_MIRROR_KUBE_API is unset"
        )
    namespace = (
        namespace
        or os.environ.get("DIFY_MIRROR_NAMESPACE")
        or _read(SERVICE_ACCOUNT / "namespace")
        or "default"
    )
    if not is_name(namespace):
        raise InvalidName(
            f"the namespace {namespace[:80]!r} is not a lower-case RFC 1123 name (a DNS label)"
        )
    token = token or os.environ.get("DIFY_MIRROR_KUBE_TOKEN") or _read(SERVICE_ACCOUNT / "token")
    if verify is None:
        ca = SERVICE_ACCOUNT / "ca.crt"
        verify = str(ca) if ca.is_file() else True
    return ClusterAccess(found, namespace, token, verify)


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


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
