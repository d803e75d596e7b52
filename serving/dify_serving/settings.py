"""One settings object, read from `DIFY_MIRROR_*` environment variables at the entry point.

Every setting is declared here once. The CLI builds `Settings`, the operator builds its
subclass `OperatorSettings` (which adds only how it watches Kubernetes), and both turn
them into the same option objects with `serve_options` (`dify_serving.options`), which
is all `render` sees. Nothing reads the environment at import time.

Secrets (database and Redis URLs, the key pepper, the bootstrap key, the audit key) are
settings too, but they never enter the options: each is read where it is used, from
`DIFY_MIRROR_<NAME>`, a file named by `DIFY_MIRROR_<NAME>_FILE` (a mounted Kubernetes
Secret), or `$DIFY_MIRROR_HOME/secrets/<name>` (mode 0600), see `security/secrets.py`.
"""

from __future__ import annotations

from copy import copy
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dify_serving.options import (
    ALL_MODULES,
    CacheOptions,
    GatewayOptions,
    LimitOptions,
    ModelSourceOptions,
    SecurityOptions,
    ServeOptions,
    TaskOptions,
)
from dify_serving.security.secrets import (
    KEY_SHAPE,
    KEY_SHAPE_TEXT,
    SECRET_NAMES,
    SecretError,
    read_secret,
)
from dify_serving.specs import check_http_url


def _same(model: type[BaseModel], name: str) -> Any:
    """The option's own field (default, bounds, description): declared there only."""
    return copy(model.model_fields[name])


def broker_kind(url: str) -> str | None:
    """The broker kind of a URL by its scheme; None for anything else."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return {"redis": "redis", "rediss": "redis", "amqp": "amqp", "amqps": "amqp"}.get(scheme)


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFY_MIRROR_", extra="ignore")

    home: Path = Field(Path(".dify-mirror"), description="State folder.")
    host: str = Field("127.0.0.1", description="Address the HTTP port listens on.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the gateway.")
    grpc_port: int = Field(
        9000,
        ge=0,
        le=65535,
        description="gRPC port of the gateway (DifyService, reflection, health); 0: off.",
    )
    modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(ALL_MODULES),
        description="Gateway modules to run, comma-separated (models,inference,openai,data).",
    )
    default_model: str | None = Field(
        None, description="Model used when a request names none (else the first LLM)."
    )
    ray_dashboard: str | None = Field(
        None, description="Ray dashboard URL (cluster); local runs use the one ray.init starts."
    )
    ray_num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs Ray may hand out locally (default: cores × overcommit).",
    )
    cpu_overcommit: float = Field(
        4.0,
        ge=1,
        le=64,
        description="Local stack: logical CPUs Ray hands out per core, so small models share "
        "one machine (each replica still pins resources.cpus math threads); 1 = none.",
    )
    ray_dashboard_port: int = Field(8265, ge=1, le=65535, description="Local dashboard port.")
    gateway_replicas: int = Field(1, ge=1, le=64, description="Gateway replicas.")
    direct_ingress: bool = Field(
        True,
        description="Gateway replicas serve the HTTP port themselves (no proxy hop).",
    )
    request_timeout_s: float = _same(GatewayOptions, "request_timeout_s")
    # request bounds
    max_body_bytes: int = _same(LimitOptions, "max_body_bytes")
    max_document_bytes: int = _same(LimitOptions, "max_document_bytes")
    max_documents: int = _same(LimitOptions, "max_documents")
    stream_idle_timeout_s: float = _same(LimitOptions, "stream_idle_timeout_s")
    max_batch_requests: int = _same(LimitOptions, "max_batch_requests")
    # result cache
    cache_ttl: float = _same(CacheOptions, "ttl_s")
    cache_max_bytes: int = _same(CacheOptions, "max_bytes")
    # async tasks
    broker: str | None = Field(
        None,
        description="Broker kind: embedded, redis or amqp (default: from DIFY_MIRROR_BROKER_URL, "
        "else embedded).",
    )
    task_ttl: float = _same(TaskOptions, "ttl_s")
    task_max_attempts: int = _same(TaskOptions, "max_attempts")
    task_lease_s: float = _same(TaskOptions, "lease_s")
    task_consumers: int = _same(TaskOptions, "consumers")
    task_concurrency: int = _same(TaskOptions, "concurrency")
    task_max_pending_per_key: int = _same(TaskOptions, "max_pending_per_key")
    webhook_allow_private: bool = _same(TaskOptions, "webhook_allow_private")
    # where weights come from
    model_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Folders local modelIds must lie under, comma-separated "
        "(default: the state folder's models/).",
    )
    hub_downloads: bool = _same(ModelSourceOptions, "hub_downloads")
    # security
    auth: bool = Field(True, description="API keys, allowlists, rate limits and audit on.")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="CIDRs whose X-Forwarded-For is believed."
    )
    ip_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="CIDRs allowed to call the API (empty: all)."
    )
    route_limits: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description="Global requests/second per route: /v1/inference=50,/v1/data/search=200.",
    )
    rate_limit_fail_open: bool = Field(False, description="Serve when Redis is down.")
    allow_per_replica_limits: bool = _same(SecurityOptions, "allow_per_replica_limits")
    require_totp_for_admin: bool = _same(SecurityOptions, "require_totp_for_admin")
    audit_record_text: bool = _same(SecurityOptions, "record_text")
    audit_retention_days: int = _same(SecurityOptions, "retention_days")
    audit_allow_short_retention: bool = _same(SecurityOptions, "allow_short_retention")
    audit_checkpoint_s: float = _same(SecurityOptions, "audit_checkpoint_s")
    audit_configmap: str | None = _same(SecurityOptions, "audit_configmap")
    metrics_public: bool = _same(SecurityOptions, "metrics_public")
    metrics_enabled: bool = _same(GatewayOptions, "metrics_enabled")
    tls_certfile: str | None = _same(SecurityOptions, "tls_certfile")
    tls_keyfile: str | None = _same(SecurityOptions, "tls_keyfile")
    qdrant_url: str | None = _same(ServeOptions, "qdrant_url")
    # Whether the gateway uses a database / Redis, without the secret itself: the operator
    # renders gateways but never connects to either, so it need not hold their URLs.
    database: bool | None = Field(
        None, description="The gateway uses DIFY_MIRROR_DATABASE_URL (default: whether it is set)."
    )
    redis: bool | None = Field(
        None, description="The gateway uses DIFY_MIRROR_REDIS_URL (default: whether it is set)."
    )
    # secrets: read where used, never copied into options (see the module docstring)
    database_url: SecretStr | None = Field(None, description="Keys + audit database URL.")
    redis_url: SecretStr | None = Field(None, description="Redis URL (shared limits).")
    broker_url: SecretStr | None = Field(
        None, description="Task broker: redis://… or amqp://… (unset: embedded)."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC key of task webhooks (X-Dify-Signature); generated if unset."
    )
    key_pepper: SecretStr | None = Field(None, description="HMAC key of stored API keys.")
    bootstrap_key: SecretStr | None = Field(None, description="The first admin key.")
    audit_key: SecretStr | None = Field(None, description="HMAC key of the audit chain.")

    @field_validator("modules")
    @classmethod
    def _known_modules(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(ALL_MODULES))
        if unknown:
            raise ValueError(
                f"unknown module(s) {', '.join(unknown)}; known: {', '.join(ALL_MODULES)}"
            )
        return value

    @field_validator("modules", "trusted_proxies", "ip_allowlist", "model_roots", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("route_limits", mode="before")
    @classmethod
    def _routes(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [p.strip().rsplit("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("route_limits: write route=requests_per_second, comma-separated")
            value = {route.strip(): float(rate) for route, rate in pairs}
        if isinstance(value, dict) and any(float(rate) <= 0 for rate in value.values()):
            raise ValueError("route_limits: requests per second must be > 0")
        return value

    @field_validator("model_roots")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        relative = [root for root in value if not Path(root).is_absolute()]
        if relative:
            raise ValueError(f"model_roots must be absolute paths, not {relative[0]!r}")
        return value

    @field_validator("qdrant_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "qdrant_url")

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, values: Any) -> Any:
        """A secret not given directly is read as a replica reads it (`read_secret`): from
        `DIFY_MIRROR_<NAME>_FILE` (a mounted Secret) or the home's secrets folder."""
        if not isinstance(values, dict):
            return values
        home = Path(values.get("home") or cls.model_fields["home"].default)
        for name in SECRET_NAMES:
            if values.get(name) is None:
                try:
                    found = read_secret(name, home)
                except SecretError as exc:
                    raise ValueError(str(exc)) from None
                if found is not None:
                    values = {**values, name: found}
        return values

    @field_validator("broker")
    @classmethod
    def _broker_kind(cls, value: str | None) -> str | None:
        if value is not None and value not in ("embedded", "redis", "amqp"):
            raise ValueError("broker must be embedded, redis or amqp")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and broker_kind(value.get_secret_value()) is None:
            raise ValueError("broker_url must be a redis://, rediss:// or amqp(s):// URL")
        return value

    def broker_kind(self) -> str:
        """embedded, redis or amqp: as set, else what the broker URL is."""
        if self.broker is not None:
            return self.broker
        url = self.secret("broker_url")
        return (broker_kind(url) if url else None) or "embedded"

    @field_validator("bootstrap_key")
    @classmethod
    def _key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not KEY_SHAPE.fullmatch(value.get_secret_value()):
            raise ValueError(f"must look like {KEY_SHAPE_TEXT}")
        return value

    # ---- options: the one mapping from settings to what the deployables are told -----
    def secret(self, name: str) -> str | None:
        """A secret's value, or None (the field; a replica uses `security.secrets`)."""
        value: SecretStr | None = getattr(self, name)
        return value.get_secret_value() if value is not None else None

    def security_options(self) -> SecurityOptions:
        return SecurityOptions(
            enabled=self.auth,
            database=self.database if self.database is not None else bool(self.database_url),
            redis=self.redis if self.redis is not None else bool(self.redis_url),
            trusted_proxies=self.trusted_proxies,
            ip_allowlist=self.ip_allowlist,
            route_limits=self.route_limits,
            fail_open=self.rate_limit_fail_open,
            require_totp_for_admin=self.require_totp_for_admin,
            record_text=self.audit_record_text,
            retention_days=self.audit_retention_days,
            allow_short_retention=self.audit_allow_short_retention,
            audit_checkpoint_s=self.audit_checkpoint_s,
            audit_configmap=self.audit_configmap,
            metrics_public=self.metrics_public,
            tls_certfile=self.tls_certfile,
            tls_keyfile=self.tls_keyfile,
            allow_per_replica_limits=self.allow_per_replica_limits,
        )

    def gateway_options(self, **control: Any) -> GatewayOptions:
        """The gateway's options; `control` names the control-plane fields of the caller."""
        home = str(self.state_dir)
        return GatewayOptions(
            modules=self.modules,
            default_model=self.default_model,
            home=home,
            replicas=self.gateway_replicas,
            grpc_host=self.host,
            grpc_port=self.grpc_port or None,
            request_timeout_s=self.request_timeout_s,
            metrics_enabled=self.metrics_enabled,
            limits=LimitOptions(
                max_body_bytes=self.max_body_bytes,
                max_document_bytes=self.max_document_bytes,
                max_documents=self.max_documents,
                stream_idle_timeout_s=self.stream_idle_timeout_s,
                max_batch_requests=self.max_batch_requests,
            ),
            cache=CacheOptions(
                ttl_s=self.cache_ttl,
                max_bytes=self.cache_max_bytes,
                redis=self.redis if self.redis is not None else bool(self.redis_url),
            ),
            tasks=TaskOptions(
                broker=self.broker_kind(),  # type: ignore[arg-type]
                database=self.database if self.database is not None else bool(self.database_url),
                ttl_s=self.task_ttl,
                max_attempts=self.task_max_attempts,
                lease_s=self.task_lease_s,
                consumers=self.task_consumers,
                concurrency=self.task_concurrency,
                max_pending_per_key=self.task_max_pending_per_key,
                webhook_allow_private=self.webhook_allow_private,
            ),
            sources=ModelSourceOptions(roots=self.model_roots, hub_downloads=self.hub_downloads),
            security=self.security_options(),
            **control,
        )

    def serve_options(self, proxy_port: int | None = None, **control: Any) -> ServeOptions:
        """Everything `render` needs. `proxy_port` moves Serve's proxy (direct ingress)."""
        if proxy_port:
            control = {**control, "listen_host": self.host, "listen_port": self.port}
        return ServeOptions(
            host=self.host,
            port=self.port,
            proxy_port=proxy_port,
            qdrant_url=self.qdrant_url,
            gateway=self.gateway_options(**control),
        )

    @property
    def state_dir(self) -> Path:
        return self.home.resolve()
