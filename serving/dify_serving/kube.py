"""How this process reaches the Kubernetes API: server, token, namespace, CA.

Shared by the gateway's catalog (DifyModel objects) and the audit checkpoint (a
ConfigMap); plain HTTP, no client library. Only an RFC 1123 name ever becomes part of
an API path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dify_serving.specs import is_name

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


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
