"""What every router takes from the app: the gateway state, the audit trail (None with
security off); and the one reading of a time given in a query (the audit and the
feedback listings filter by time alike)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request

from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.state import GatewayState
from dify_serving.security.audit import AuditTrail


async def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


async def get_audit(request: Request) -> AuditTrail | None:
    guard = getattr(request.app.state, "guard", None)
    return None if guard is None else guard.audit


AuditDep = Annotated[AuditTrail | None, Depends(get_audit)]


def parse_time(value: str | None, name: str) -> float | None:
    """ISO time (UTC unless it says) or unix seconds; a 422 naming `name` otherwise."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(
            422, "invalid_request", f"{name}: give an ISO time or unix seconds, not {value!r}"
        ) from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
