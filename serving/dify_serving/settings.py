"""One settings object, read from `DIFY_MIRROR_*` environment variables at the entry point.

Nothing reads the environment at import time; `Settings()` is built by the CLI, the
operator or a Serve replica's constructor and passed down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
