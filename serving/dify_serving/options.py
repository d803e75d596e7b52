"""What each deployable is told: plain option models, declared once.

`render` takes these and puts them into the Serve config; the gateway, model and index
replicas read them back from there. `Settings` (the CLI, one machine) and the operator's
settings (a cluster) both build them with the same `Settings.serve_options`, so a
gateway is configured the same way on a laptop and in a cluster.

Nothing here is a secret: the Serve config is shown by the Ray dashboard and copied into
`desired-state.json`. Database and Redis URLs, the key pepper and the bootstrap key are
read by the process that needs them (`security/secrets.py`); the options only say that
one is configured, so a replica that cannot read it refuses to start instead of
silently falling back to an in-process default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dify_serving.specs import ResourceName

#: Gateway modules that can be switched off for small edge deployments.
ALL_MODULES: tuple[str, ...] = ("models", "inference", "openai", "data")
MIB = 1024 * 1024


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecurityOptions(_Options):
    """The gateway's guard. Secrets are not here: `database`/`redis` say one is configured."""

    enabled: bool = Field(True, description="API keys, allowlists, rate limits and audit")
    database: bool = Field(
        False, description="keys + audit in the database of DIFY_MIRROR_DATABASE_URL (a secret)"
    )
    redis: bool = Field(
        False, description="rate limits, one-time codes and lockouts in DIFY_MIRROR_REDIS_URL"
    )
    trusted_proxies: list[str] = Field(default_factory=list, description="CIDRs (ingress)")
    ip_allowlist: list[str] = Field(default_factory=list, description="CIDRs; empty: all")
    route_limits: dict[str, float] = Field(
        default_factory=dict, description="route template → requests/second, all keys"
    )
    fail_open: bool = Field(False, description="allow requests when Redis is down")
    require_totp_for_admin: bool = Field(False, description="sensitive routes need TOTP")
    record_text: bool = Field(False, description="audit rows keep prompt/document text")
    retention_days: int = Field(180, ge=1, description="audit rows kept at least this long")
    allow_short_retention: bool = Field(False, description="permit retention < 180 days")
    audit_checkpoint_s: float = Field(
        60.0, gt=0, le=3600, description="seconds between checkpoints of the audit chain's head"
    )
    audit_configmap: ResourceName | None = Field(
        None, description="in a cluster, also checkpoint the audit head in this ConfigMap"
    )
    metrics_public: bool = Field(
        False, description="GET /v1/metrics without a key (a cluster-internal port only)"
    )
    tls_certfile: str | None = Field(None, description="serve HTTPS with this certificate")
    tls_keyfile: str | None = Field(None, description="path of its private key (never its text)")
    allow_per_replica_limits: bool = Field(
        False,
        description="permit several gateway replicas without Redis (limits, one-time codes "
        "and lockouts then count per replica)",
    )


class LimitOptions(_Options):
    """Bounds on what one request may carry, checked in the gateway before any replica."""

    max_body_bytes: int = Field(
        16 * MIB, ge=1024, le=1024 * MIB, description="Largest request body (bytes)."
    )
    max_document_bytes: int = Field(
        10 * MIB, ge=1, le=1024 * MIB, description="Largest document an upsert accepts (bytes)."
    )
    max_documents: int = Field(
        1000, ge=1, le=100_000, description="Most documents in one upsert request."
    )
    stream_idle_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="A stream with no event for this long is ended."
    )
    max_batch_requests: int = Field(
        64, ge=1, le=4096, description="Most requests in one POST /v1/inference/batch."
    )


class CacheOptions(_Options):
    """The result cache: searches, deterministic inference and embeddings (`tasks/cache.py`)."""

    ttl_s: float = Field(
        300.0, ge=0, le=86400, description="Seconds a cached answer is served (0: no cache)."
    )
    max_bytes: int = Field(
        64 * MIB, ge=0, le=16 * 1024 * MIB, description="Bytes the in-process cache holds (LRU)."
    )
    redis: bool = Field(
        False, description="Share the cache in the Redis of DIFY_MIRROR_REDIS_URL (a secret)."
    )


class TaskOptions(_Options):
    """Async tasks (`tasks/`): Ray Serve task consumers over a broker, results in a store.

    The broker's URL is a secret (`DIFY_MIRROR_BROKER_URL`); `broker` only names its kind,
    so a consumer that cannot read it refuses to start instead of using another queue.
    """

    broker: Literal["embedded", "redis", "amqp"] = Field(
        "embedded",
        description="embedded: SQLite under the state folder (one machine, no server); "
        "redis or amqp (RabbitMQ): the broker of DIFY_MIRROR_BROKER_URL",
    )
    database: bool = Field(
        False,
        description="Task rows in the database of DIFY_MIRROR_DATABASE_URL (else SQLite "
        "under the state folder)",
    )
    ttl_s: float = Field(
        86400.0, ge=60, le=90 * 86400, description="Seconds a finished task's result is kept."
    )
    max_attempts: int = Field(
        3, ge=1, le=10, description="Runs of a task whose consumer died before it finished."
    )
    lease_s: float = Field(
        30.0,
        ge=2,
        le=3600,
        description="A running task whose consumer is silent this long is run again.",
    )
    consumers: int = Field(1, ge=1, le=64, description="Consumer replicas of the shared queue.")
    concurrency: int = Field(
        64, ge=1, le=1024, description="Tasks one consumer replica runs at once."
    )
    max_pending_per_key: int = Field(
        10_000, ge=1, le=1_000_000, description="Unfinished tasks one key may have."
    )
    webhook_allow_private: bool = Field(
        False,
        description="callback_url may point at loopback, link-local or private addresses",
    )


class ModelSourceOptions(_Options):
    """Where model and index replicas may load weights from."""

    roots: list[str] = Field(
        default_factory=list,
        description="Folders a local modelId must lie under (absolute paths); empty: only "
        "the state folder's models/.",
    )
    hub_downloads: bool = Field(
        False, description="Fetch hub ids from the network; otherwise the local cache only."
    )


class GatewayOptions(_Options):
    """What the gateway app is told; part of the config, so a change redeploys it."""

    modules: list[str] = Field(default_factory=lambda: list(ALL_MODULES))
    default_model: str | None = None
    home: str = ".dify-mirror"
    control: str = Field("local", description="local (file store + Ray) or kubernetes")
    dashboard_url: str | None = None
    replicas: int = Field(1, ge=1, le=64)
    listen_host: str | None = Field(None, description="Serve HTTP here directly (no proxy)")
    listen_port: int | None = None
    grpc_host: str = Field("127.0.0.1", description="Address the gRPC port listens on")
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="Serve DifyService over gRPC here (None: off)"
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Longest wait for a model")
    metrics_enabled: bool = Field(
        True, description="count requests for GET /v1/metrics (off: only what replicas push)"
    )
    limits: LimitOptions = Field(default_factory=LimitOptions)
    cache: CacheOptions = Field(default_factory=CacheOptions)
    tasks: TaskOptions = Field(default_factory=TaskOptions)
    sources: ModelSourceOptions = Field(default_factory=ModelSourceOptions)
    security: SecurityOptions = Field(default_factory=SecurityOptions)

    @model_validator(mode="after")
    def _shared_limits(self) -> GatewayOptions:
        security = self.security
        if (
            self.replicas > 1
            and security.enabled
            and not security.redis
            and not security.allow_per_replica_limits
        ):
            raise ValueError(
                f"{self.replicas} gateway replicas need DIFY_MIRROR_REDIS_URL: without it each "
                "replica keeps its own rate limits, one-time codes and lockouts (set "
                "DIFY_MIRROR_ALLOW_PER_REPLICA_LIMITS=true to accept that)"
            )
        return self


class ServeOptions(_Options):
    host: str = "127.0.0.1"
    port: int = 8000
    proxy_port: int | None = Field(
        None,
        description="Port of Serve's own proxy when the gateway serves `port` directly "
        "(direct ingress); None: the proxy serves `port`.",
    )
    qdrant_url: str | None = Field(
        None, description="Qdrant server for indexes of store type embedded (None: on disk)."
    )
    gateway: GatewayOptions = Field(default_factory=GatewayOptions)
