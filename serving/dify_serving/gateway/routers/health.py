"""Probes. Public, so they say little: a status and, when not ready, a short reason code.

Readiness is what the gateway's status refresh last found: in a Serve replica a
background loop reads Ray Serve's status every few seconds anyway (`StatusCache.start`),
so a probe reads its outcome and costs no dashboard call. An app without that loop (built
in-process, in tests) refreshes on demand, at most once per `READY_CACHE_S`, concurrent
probes sharing one call. Not ready: the last refresh failed, or none has worked for
`STALE_S` (the dashboard hangs rather than refuses).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dify_serving.gateway.state import GatewayState

router = APIRouter(tags=["operations"])

#: How long one on-demand refresh answers probes (no refresh loop running).
READY_CACHE_S = 1.5
#: Age of the last successful refresh past which the gateway is not ready: three of the
#: refresh loop's idle periods.
STALE_S = 15.0


def not_ready_reason(state: GatewayState) -> str | None:
    """Why the gateway is not ready, from its last refresh; None when it is."""
    status = state.status
    if status.refresh_failure is not None:
        return status.refresh_failure
    if status.refreshed_at is None or time.monotonic() - status.refreshed_at > STALE_S:
        return "status_stale"
    return None


@router.get("/healthz", summary="Liveness: the gateway process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the gateway can reach Ray Serve")
async def readyz(request: Request) -> Any:
    state: GatewayState = request.app.state.gateway
    if not state.status.refreshing:
        await state.status.refresh_if_older(READY_CACHE_S)
    reason = not_ready_reason(state)
    if reason is not None:
        return JSONResponse(
            {"status": "unavailable", "reason": reason},
            status_code=503,
            headers={"Retry-After": "2"},
        )
    phases = [s.get("phase") for s in state.status.models.values()]
    return {
        "status": "ready",
        "models": {"total": len(phases), "ready": phases.count("Ready")},
    }
