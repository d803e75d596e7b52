from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the gateway process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the gateway can reach Ray Serve")
async def readyz(request: Request) -> Any:
    state = request.app.state.gateway
    try:
        await state.refresh_status()
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
    return {"status": "ready", "models": {n: s["phase"] for n, s in state.statuses.items()}}
