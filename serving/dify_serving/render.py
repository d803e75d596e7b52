"""Render the desired state into one Ray Serve multi-application config.

Pure and level-based: all specs in, the whole config out, sorted, so rendering the same
state twice gives byte-identical JSON and re-applying it changes nothing in Ray. Nothing
here imports ray or torch; the operator calls it too.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from dify_serving.manifests import DesiredState
from dify_serving.settings import ALL_MODULES
from dify_serving.specs import DifyIndex, DifyModel, Task

GATEWAY_APP = "gateway"
MODEL_APP_PREFIX = "model-"
INDEX_APP_PREFIX = "index-"
#: Seconds a replica waits for in-flight requests when its model is unloaded.
GRACEFUL_SHUTDOWN_S = 3.0


class SecurityOptions(BaseModel):
    """The gateway's guard (no secrets here: keys' pepper and bootstrap key come from env)."""

    enabled: bool = Field(True, description="API keys, allowlists, rate limits and audit")
    database_url: str | None = Field(None, description="keys + audit (None: SQLite in home)")
    redis_url: str | None = Field(None, description="shared rate limits and OTP replay")
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
    tls_certfile: str | None = Field(None, description="serve HTTPS with this certificate")
    tls_keyfile: str | None = Field(None, description="and this private key")


class GatewayOptions(BaseModel):
    """What the gateway app is told; part of the config, so a change redeploys it."""

    modules: list[str] = Field(default_factory=lambda: list(ALL_MODULES))
    default_model: str | None = None
    home: str = ".dify-mirror"
    control: str = Field("local", description="local (file store + Ray) or kubernetes")
    dashboard_url: str | None = None
    replicas: int = 1
    listen_host: str | None = Field(None, description="Serve HTTP here directly (no proxy)")
    listen_port: int | None = None
    request_timeout_s: float = Field(300.0, gt=0, description="Longest wait for a model")
    max_document_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="Largest document /v1/data/upsert accepts"
    )
    security: SecurityOptions = Field(default_factory=SecurityOptions)


class ServeOptions(BaseModel):
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


def model_app_name(name: str) -> str:
    return f"{MODEL_APP_PREFIX}{name}"


def index_app_name(name: str) -> str:
    return f"{INDEX_APP_PREFIX}{name}"


def _threads(cpus: float) -> int:
    return max(1, round(cpus))


def model_app(model: DifyModel, home: str) -> dict[str, Any]:
    """One model → one Serve application (no HTTP route; reached through the gateway)."""
    spec = model.spec
    gpus = max(spec.resources.gpus, 1.0) if spec.uses_cuda else spec.resources.gpus
    threads = str(_threads(spec.resources.cpus))
    actor: dict[str, Any] = {
        "num_cpus": spec.resources.cpus,
        "num_gpus": gpus,
        "runtime_env": {
            "env_vars": {
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "TOKENIZERS_PARALLELISM": "false",
            }
        },
    }
    deployment: dict[str, Any] = {
        "name": "ModelServer",
        "max_ongoing_requests": spec.batching.max_concurrent_requests,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5,
        "ray_actor_options": actor,
    }
    if spec.autoscaling:
        deployment["autoscaling_config"] = {
            "min_replicas": spec.autoscaling.min_replicas,
            "max_replicas": spec.autoscaling.max_replicas,
            "target_ongoing_requests": spec.autoscaling.target_ongoing_requests,
        }
    else:
        deployment["num_replicas"] = spec.replicas
    return {
        "name": model_app_name(model.name),
        "route_prefix": None,  # omitted would mean "/": model apps have no HTTP route
        "import_path": "dify_serving.deployments:build_model_app",
        "args": {"name": model.name, "spec": spec.wire(), "home": home},
        "deployments": [deployment],
    }


def index_app(
    index: DifyIndex, model: DifyModel, home: str, qdrant_url: str | None
) -> dict[str, Any]:
    """One index → one Serve application: the single writer of its collection.

    One replica: an embedded shard is a directory one process owns. It needs little CPU
    (tokenizing, the store); the embedding model app does the heavy work.
    """
    one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {
        "name": index_app_name(index.name),
        "route_prefix": None,
        "import_path": "dify_serving.knowledge.server:build_index_app",
        "args": {
            "name": index.name,
            "spec": index.spec.wire(),
            "model": {"name": model.name, "spec": model.spec.wire()},
            "home": home,
            "qdrant_url": qdrant_url,
        },
        "deployments": [
            {
                "name": "IndexServer",
                "num_replicas": 1,
                "max_ongoing_requests": 256,
                "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
                "graceful_shutdown_wait_loop_s": 0.5,
                "health_check_period_s": 5,
                "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": one}},
            }
        ],
    }


def servable_indexes(state: DesiredState) -> list[tuple[DifyIndex, DifyModel]]:
    """Indexes whose embedding model exists and embeds; the others wait (Pending)."""
    out = []
    for name in sorted(state.indexes):
        index = state.indexes[name]
        model = state.models.get(index.spec.embedding_model)
        if model is not None and model.spec.task == Task.FEATURE_EXTRACTION:
            out.append((index, model))
    return out


def gateway_app(options: GatewayOptions) -> dict[str, Any]:
    return {
        "name": GATEWAY_APP,
        "route_prefix": "/",
        "import_path": "dify_serving.gateway.app:build_gateway_app",
        "args": options.model_dump(mode="json"),
        "deployments": [
            {
                "name": "Gateway",
                "num_replicas": options.replicas,
                "max_ongoing_requests": 1000,
                "ray_actor_options": {"num_cpus": 0},
            }
        ],
    }


def render_serve_config(state: DesiredState, options: ServeOptions) -> dict[str, Any]:
    """The whole Serve config for a desired state. Same input, same output."""
    apps = [gateway_app(options.gateway)]
    apps += [model_app(state.models[name], options.gateway.home) for name in sorted(state.models)]
    if "data" in options.gateway.modules:  # a switched-off module starts no backends
        apps += [
            index_app(index, model, options.gateway.home, options.qdrant_url)
            for index, model in servable_indexes(state)
        ]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": options.host, "port": options.proxy_port or options.port},
        "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
        "applications": apps,
    }
