"""Operator settings: one object from `DIFY_MIRROR_*` variables, built at start-up."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFY_MIRROR_", extra="ignore")

    ray_dashboard: str = Field(
        "http://dify-mirror-ray-head:8265", description="Ray dashboard URL of the cluster."
    )
    namespace: str | None = Field(
        None, description="Namespace to watch; unset with cluster_wide=false means 'default'."
    )
    cluster_wide: bool = Field(False, description="Watch every namespace.")
    gateway_url: str = Field(
        "http://dify-mirror-gateway:8000", description="Where users reach the gateway."
    )
    serve_host: str = Field("0.0.0.0", description="Serve HTTP host on the Ray head.")
    serve_port: int = Field(8000, description="Serve HTTP port on the Ray head.")
    home: str = Field("/tmp/dify-mirror", description="State folder on the Ray nodes.")
    modules: str = Field("models,inference,openai,data", description="Gateway modules.")
    qdrant_url: str | None = Field(
        None, description="Qdrant server for indexes with store type embedded (None: on disk)."
    )
    status_period_s: float = Field(3.0, gt=0, description="Status refresh while not Ready.")
    ready_period_s: float = Field(30.0, gt=0, description="Status refresh once Ready.")
    retry_delay_s: float = Field(5.0, gt=0, description="Back-off while Ray is unreachable.")
    peering: str | None = Field(
        "dify-mirror", description="kopf peering name (leader election); empty: standalone."
    )
    liveness_port: int = Field(8080, description="Port of /healthz for the kubelet probes.")
