"""What every router takes from the app: the gateway state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dify_serving.gateway.state import GatewayState


async def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]
