"""Operations: API keys (`/v1/admin/keys`) and the audit trail (`/v1/audit/*`).

Scopes and the second factor are declared at each route and enforced by the security
middleware (see `policy.py`); these handlers only translate. A key's secret is in the
creation response and nowhere else, ever. An `audit:read` key without `admin` reads only
its own rows: the trail names other keys, addresses and models, which is more than a
tenant's key should learn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dify_serving.gateway import access
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.notes import note
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import parse_time
from dify_serving.gateway.security import Guard
from dify_serving.security.grants import (
    ADMIN,
    AUDIT_READ,
    MAX_PATTERN_CHARS,
    MAX_PATTERNS,
    SCOPES,
)

router = APIRouter(prefix="/v1", tags=["operations"])


async def get_guard(request: Request) -> Guard:
    guard: Guard | None = getattr(request.app.state, "guard", None)
    if guard is None:
        raise ApiError(
            404, "not_found", "security is switched off on this gateway (DIFY_MIRROR_AUTH=false)"
        )
    return guard


GuardDep = Annotated[Guard, Depends(get_guard)]


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=1, description="Requests per minute.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Generated tokens per minute.")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=200, description="What the key is for.")
    scopes: list[Literal[SCOPES]] = Field(  # type: ignore[valid-type]
        ..., min_length=1, max_length=len(SCOPES), description="Granted scopes."
    )
    expires_at: datetime | None = Field(None, description="ISO time; never when null.")
    ip_allowlist: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=256, description="CIDRs, IPv4 or IPv6."
    )
    rate_limit: RateLimit | None = Field(None, description="Per-key limits.")
    totp: bool = Field(False, description="Give the key a TOTP second factor.")
    models: list[Annotated[str, Field(max_length=MAX_PATTERN_CHARS)]] | None = Field(
        None,
        max_length=MAX_PATTERNS,
        description="Model name patterns the key may use (`support-*`); every model when "
        "left out. Not with admin.",
    )
    indexes: list[Annotated[str, Field(max_length=MAX_PATTERN_CHARS)]] | None = Field(
        None,
        max_length=MAX_PATTERNS,
        description="Index name patterns the key may use; every index when left out.",
    )


def _public(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "scopes": sorted(record.scopes),
        "created_at": _iso(record.created_at),
        "expires_at": _iso(record.expires_at),
        "ip_allowlist": list(record.ip_allowlist),
        "rate_limit": record.rate_limit,
        "totp": record.totp_enabled,
        "revoked": record.revoked,
        "models": None if record.models is None else list(record.models),
        "indexes": None if record.indexes is None else list(record.indexes),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@router.post(
    "/admin/keys",
    status_code=201,
    summary="Create an API key (secret shown once)",
    openapi_extra=needs(ADMIN, sensitive=True),
)
async def create_key(body: KeyCreate, guard: GuardDep) -> dict[str, Any]:
    expires = body.expires_at
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    if expires is not None and expires <= datetime.now(UTC):
        raise ApiError(422, "invalid_request", "expires_at: must be in the future")
    try:
        created = await asyncio.to_thread(
            guard.keys.create,
            body.name,
            list(body.scopes),
            expires_at=expires,
            ip_allowlist=body.ip_allowlist,
            rate_limit=body.rate_limit.model_dump(exclude_none=True) if body.rate_limit else None,
            totp=body.totp,
            models=body.models,
            indexes=body.indexes,
        )
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    note(detail=f"created key {created.id}")
    out: dict[str, Any] = {"id": created.id, "key": created.key}
    if body.totp:
        out |= {"totp_secret": created.totp_secret, "totp_uri": created.totp_uri}
    return out


@router.get(
    "/admin/keys",
    summary="API keys (never their secrets)",
    openapi_extra=needs(ADMIN, sensitive=True),
)
async def list_keys(guard: GuardDep) -> dict[str, Any]:
    records = await asyncio.to_thread(guard.keys.list)
    return {"object": "list", "data": [_public(r) for r in records]}


@router.delete(
    "/admin/keys/{key_id}",
    summary="Revoke an API key",
    openapi_extra=needs(ADMIN, sensitive=True),
)
async def revoke_key(key_id: str, guard: GuardDep) -> dict[str, Any]:
    revoked = await asyncio.to_thread(guard.keys.revoke, key_id)
    guard.forget_keys()  # at once on this replica (others: within the store's cache time)
    if not revoked:
        raise ApiError(404, "not_found", f"key {key_id!r} does not exist")
    note(detail=f"revoked key {key_id}")
    return {"id": key_id, "revoked": True}


class AuditFilters(BaseModel):
    since: str | None = Field(
        None, max_length=64, description="ISO time or unix seconds (inclusive)."
    )
    until: str | None = Field(
        None, max_length=64, description="ISO time or unix seconds (exclusive)."
    )
    key_id: str | None = Field(None, max_length=64)
    route: str | None = Field(None, max_length=256)
    status: int | None = Field(None, ge=100, le=599)
    client_ip: str | None = Field(None, max_length=64)

    def query(self) -> dict[str, Any]:
        """The filters for `AuditLog.query`; a key without admin reads its own rows only."""
        key = access.current()
        key_id = self.key_id
        if key is not None and not access.is_admin():
            if key_id is not None and key_id != key.id:
                raise ApiError(
                    403,
                    "forbidden",
                    f"key {key.id} may read only its own audit rows (key_id={key.id})",
                )
            key_id = key.id
        return {
            "since": parse_time(self.since, "since"),
            "until": parse_time(self.until, "until"),
            "key_id": key_id,
            "route": self.route,
            "status": self.status,
            "client_ip": self.client_ip,
        }


@router.get(
    "/audit/logs",
    summary="Audit rows in chain order (oldest first), paged by cursor",
    openapi_extra=needs(AUDIT_READ),
)
async def audit_logs(
    guard: GuardDep,
    filters: Annotated[AuditFilters, Query()],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    await asyncio.to_thread(guard.audit.flush)
    try:
        rows, next_cursor = await asyncio.to_thread(
            lambda: guard.audit.query(**filters.query(), limit=limit, cursor=cursor)
        )
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    return {"object": "list", "data": rows, "next_cursor": next_cursor}


@router.get(
    "/audit/export",
    summary="Export audit rows as JSONL or CSV (sensitive)",
    openapi_extra=needs(AUDIT_READ, sensitive=True),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One row per line: JSON objects (`format=jsonl`) or CSV.",
            "content": {"application/x-ndjson": {}, "text/csv": {}},
        }
    },
)
async def audit_export(
    guard: GuardDep,
    filters: Annotated[AuditFilters, Query()],
    format: Literal["jsonl", "csv"] = "jsonl",
) -> StreamingResponse:
    await asyncio.to_thread(guard.audit.flush)
    lines: Iterator[str] = guard.audit.export(format, **filters.query())
    note(detail=f"audit export ({format})")

    async def stream() -> AsyncIterator[bytes]:
        while True:
            chunk = await asyncio.to_thread(lambda: list(_take(lines, 500)))
            if not chunk:
                return
            yield "".join(chunk).encode()

    media = "application/x-ndjson" if format == "jsonl" else "text/csv"
    return StreamingResponse(
        stream(),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="audit.{format}"'},
    )


def _take(lines: Iterator[str], n: int) -> Iterator[str]:
    for _, line in zip(range(n), lines, strict=False):
        yield line
