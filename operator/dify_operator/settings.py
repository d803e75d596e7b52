"""Operator settings: the shared `Settings` plus how the operator watches Kubernetes.

Every gateway, model and index setting is inherited, not declared again, so the gateway
the operator renders gets the same options a local `dify-mirror serve` would give it
from the same environment (`Settings.serve_options`). Only the defaults that differ in
a cluster are overridden here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from dify_serving.settings import Settings


class OperatorSettings(Settings):
    host: str = Field("0.0.0.0", description="Serve HTTP host on the Ray head.")
    home: Path = Field(Path("/tmp/dify-mirror"), description="State folder on the Ray nodes.")
    ray_dashboard: str = Field(  # type: ignore[assignment]
        "http://dify-mirror-ray-head:8265", description="Ray dashboard URL of the cluster."
    )
    namespace: str | None = Field(
        None, description="Namespace to watch; unset with cluster_wide=false means 'default'."
    )
    cluster_wide: bool = Field(False, description="Watch every namespace.")
    gateway_url: str = Field(
        "http://dify-mirror-gateway:8080", description="Where users reach the gateway."
    )
    status_period_s: float = Field(3.0, gt=0, description="Status refresh while not Ready.")
    ready_period_s: float = Field(30.0, gt=0, description="Status refresh once Ready.")
    retry_delay_s: float = Field(5.0, gt=0, description="Back-off while Ray is unreachable.")
    peering: str | None = Field(
        "dify-mirror", description="kopf peering name (leader election); empty: standalone."
    )
    peering_priority: int | None = Field(
        None,
        ge=0,
        description="kopf peering priority: the highest runs, the others wait. Unset: random "
        "in 1..32767 per start, since replicas with the same priority all pause.",
    )
    liveness_port: int = Field(8080, description="Port of /healthz for the kubelet probes.")
