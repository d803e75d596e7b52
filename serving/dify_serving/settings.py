"""One settings object, read from `DIFY_MIRROR_*` environment variables at the entry point.

Nothing reads the environment at import time; `Settings()` is built by the CLI, the
operator or a Serve replica's constructor and passed down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from dify_serving.render import SecurityOptions

#: Gateway modules that can be switched off for small edge deployments.
ALL_MODULES: tuple[str, ...] = ("models", "inference", "openai", "data")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFY_MIRROR_", extra="ignore")

    home: Path = Field(Path(".dify-mirror"), description="State folder.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on.")
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
    max_document_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="Largest document an upsert accepts (bytes)."
    )
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
    require_totp_for_admin: bool = Field(
        False, description="Sensitive operations need a key with a second factor."
    )
    audit_record_text: bool = Field(False, description="Audit rows keep request text.")
    audit_retention_days: int = Field(180, ge=1, description="Audit rows kept this long.")
    audit_allow_short_retention: bool = Field(False, description="Permit retention < 180.")
    tls_certfile: str | None = Field(None, description="Serve HTTPS with this certificate.")
    tls_keyfile: str | None = Field(None, description="Private key of tls_certfile.")
    redis_url: str | None = None
    database_url: str | None = None
    qdrant_url: str | None = None

    @field_validator("modules", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            value = [m.strip() for m in value.split(",") if m.strip()]
        if isinstance(value, list):
            unknown = sorted(set(value) - set(ALL_MODULES))
            if unknown:
                raise ValueError(
                    f"unknown module(s) {', '.join(unknown)}; known: {', '.join(ALL_MODULES)}"
                )
        return value

    @field_validator("trusted_proxies", "ip_allowlist", mode="before")
    @classmethod
    def _cidrs(cls, value: object) -> object:
        if isinstance(value, str):
            return [c.strip() for c in value.split(",") if c.strip()]
        return value

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

    def security_options(self) -> SecurityOptions:
        from dify_serving.render import SecurityOptions  # render imports this module

        return SecurityOptions(
            enabled=self.auth,
            database_url=self.database_url,
            redis_url=self.redis_url,
            trusted_proxies=self.trusted_proxies,
            ip_allowlist=self.ip_allowlist,
            route_limits=self.route_limits,
            fail_open=self.rate_limit_fail_open,
            require_totp_for_admin=self.require_totp_for_admin,
            record_text=self.audit_record_text,
            retention_days=self.audit_retention_days,
            allow_short_retention=self.audit_allow_short_retention,
            tls_certfile=self.tls_certfile,
            tls_keyfile=self.tls_keyfile,
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
