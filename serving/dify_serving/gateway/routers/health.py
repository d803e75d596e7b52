"""Probes. Public, so they say little: a status and, when not ready, a short reason code.

Readiness asks the Ray dashboard (through the gateway's status refresh); probes from a
kubelet, a load balancer and a monitor would otherwise each cost a dashboard call, so
the answer is kept for `READY_CACHE_S` and concurrent probes wait for one check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dify_serving.control import RayUnavailable
from dify_serving.gateway.state import GatewayState
from dify_serving.store.kubernetes import KubernetesUnavailable

router = APIRouter(tags=["operations"])
log = logging.getLogger("dify_serving.gateway")

#: How long one readiness answer is reused.
READY_CACHE_S = 1.5


class Readiness:
    """The last readiness answer and when it was found; one check at a time."""

    def __init__(self) -> None:
        self.checked = float("-inf")
        self.reason: str | None = None  # None: ready
        self.lock = asyncio.Lock()

    async def reason_not_ready(self, state: GatewayState) -> str | None:
        if time.monotonic() - self.checked < READY_CACHE_S:
            return self.reason
        async with self.lock:
            if time.monotonic() - self.checked >= READY_CACHE_S:
                self.reason = await _check(state)
                self.checked = time.monotonic()
        return self.reason


async def _check(state: GatewayState) -> str | None:
    try:
        await state.refresh_status()
    except RayUnavailable as exc:
        log.warning("not ready: %s", exc)
        return "ray_unavailable"
    except KubernetesUnavailable as exc:
        log.warning("not ready: %s", exc)
        return "kubernetes_unavailable"
    except Exception:
        log.exception("not ready: the status refresh failed")
        return "status_unavailable"
    return None


@router.get("/healthz", summary="Liveness: the gateway process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the gateway can reach Ray Serve")
async def readyz(request: Request) -> Any:
    readiness: Readiness | None = getattr(request.app.state, "readiness", None)
    if readiness is None:
        readiness = request.app.state.readiness = Readiness()
    state: GatewayState = request.app.state.gateway
    reason = await readiness.reason_not_ready(state)
    if reason is not None:
        return JSONResponse(
            {"status": "unavailable", "reason": reason},
            status_code=503,
            headers={"Retry-After": "2"},
        )
    phases = [s.get("phase") for s in state.statuses.values()]
    return {
        "status": "ready",
        "models": {"total": len(phases), "ready": phases.count("Ready")},
    }
