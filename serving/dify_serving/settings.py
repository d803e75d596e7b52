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

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dify_serving.options import (
    ALL_MODULES,
    GatewayOptions,
    LimitOptions,
    ModelSourceOptions,
    SecurityOptions,
    ServeOptions,
)

#: `dm_<12 lowercase letters or digits>_<secret>`: the shape of every API key.
KEY_SHAPE = re.compile(r"dm_([a-z0-9]{12})_([A-Za-z0-9_-]{32,256})")
KEY_SHAPE_TEXT = "dm_<12 lowercase letters or digits>_<32+ characters>"
#: Secrets a process may read (`security/secrets.py`): never in options or logs.
SECRET_NAMES = ("database_url", "redis_url", "key_pepper", "bootstrap_key", "audit_key")


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFY_MIRROR_", extra="ignore")

    home: Path = Field(Path(".dify-mirror"), description="State folder.")
    host: str = Field("127.0.0.1", description="Address the HTTP port listens on.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the gateway.")
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
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs Ray may use locally.")
    ray_dashboard_port: int = Field(8265, ge=1, le=65535, description="Local dashboard port.")
    gateway_replicas: int = Field(1, ge=1, le=64, description="Gateway replicas.")
    direct_ingress: bool = Field(
        True,
        description="Gateway replicas serve the HTTP port themselves (no proxy hop).",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Longest wait for a model.")
    # request bounds
    max_body_bytes: int = Field(LimitOptions().max_body_bytes, description="Largest body.")
    max_document_bytes: int = Field(
        LimitOptions().max_document_bytes, description="Largest document an upsert accepts."
    )
    max_documents: int = Field(LimitOptions().max_documents, description="Documents/upsert.")
    stream_idle_timeout_s: float = Field(
        LimitOptions().stream_idle_timeout_s, description="End a stream idle this long."
    )
    # where weights come from
    model_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Folders local modelIds must lie under, comma-separated "
        "(default: the state folder's models/).",
    )
    hub_downloads: bool = Field(False, description="Fetch hub ids (else the local cache only).")
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
    allow_per_replica_limits: bool = Field(
        False, description="Several gateway replicas without Redis (limits per replica)."
    )
    require_totp_for_admin: bool = Field(
        False, description="Sensitive operations need a key with a second factor."
    )
    audit_record_text: bool = Field(False, description="Audit rows keep request text.")
    audit_retention_days: int = Field(180, ge=1, description="Audit rows kept this long.")
    audit_allow_short_retention: bool = Field(False, description="Permit retention < 180.")
    audit_checkpoint_s: float = Field(60.0, gt=0, le=3600, description="Chain checkpoints.")
    audit_configmap: str | None = Field(
        None, description="ConfigMap that also keeps the audit head (cluster)."
    )
    tls_certfile: str | None = Field(None, description="Serve HTTPS with this certificate.")
    tls_keyfile: str | None = Field(None, description="Path of tls_certfile's private key.")
    qdrant_url: str | None = Field(None, description="Qdrant server for embedded indexes.")
    # secrets: read where used, never copied into options (see the module docstring)
    database_url: SecretStr | None = Field(None, description="Keys + audit database URL.")
    redis_url: SecretStr | None = Field(None, description="Redis URL (shared limits).")
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
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("qdrant_url must be an http:// or https:// URL")
        return value

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, values: Any) -> Any:
        """`DIFY_MIRROR_<NAME>_FILE` stands for `DIFY_MIRROR_<NAME>` (a mounted Secret)."""
        if not isinstance(values, dict):
            return values
        for name in SECRET_NAMES:
            if values.get(name) is None:
                path = os.environ.get(f"DIFY_MIRROR_{name.upper()}_FILE")
                if path:
                    values = {**values, name: Path(path).read_text().strip()}
        return values

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
            database=self.database_url is not None,
            redis=self.redis_url is not None,
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
            request_timeout_s=self.request_timeout_s,
            limits=LimitOptions(
                max_body_bytes=self.max_body_bytes,
                max_document_bytes=self.max_document_bytes,
                max_documents=self.max_documents,
                stream_idle_timeout_s=self.stream_idle_timeout_s,
            ),
            sources=ModelSourceOptions(
                roots=self.model_roots or [str(Path(home) / "models")],
                hub_downloads=self.hub_downloads,
            ),
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


def ray_auth_token() -> str | None:
    """The Ray auth token: `RAY_AUTH_TOKEN`, else the file Ray writes on first start."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None
