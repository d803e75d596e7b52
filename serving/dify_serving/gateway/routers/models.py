"""Model management: list, status (with device and memory), load, unload."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from fastapi.responses import JSONResponse

from dify_serving.gateway import access
from dify_serving.gateway.dataplane import models as plane
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import StateDep
from dify_serving.gateway.routers.health import READY_CACHE_S
from dify_serving.gateway.schemas import (
    LoadRequest,
    ModelCard,
    ModelList,
    SwitchRequest,
    UnloadRequest,
)
from dify_serving.gateway.status_cache import SERVING
from dify_serving.security.grants import INFERENCE, MODELS_ADMIN
from dify_serving.specs import NAME_PATTERN, Phase, Rollout

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get(
    "",
    response_model=ModelList,
    summary="Models (OpenAI list shape, with phase)",
    openapi_extra=needs(INFERENCE),
)
async def list_models(state: StateDep) -> ModelList:
    now = int(time.time())
    cards = [
        ModelCard(
            id=name,
            created=now,
            task=str(m.spec.task),
            model_id=access.shown_model_id(m.spec.model_id),
            phase=phase,
        )
        for name, m, phase in plane.visible(state)
    ]
    return ModelList(data=cards)


@router.get(
    "/status",
    summary="Per model: phase, replicas, device, precision, memory, GPUs",
    openapi_extra=needs(INFERENCE),
)
async def models_status(state: StateDep) -> dict[str, Any]:
    return {"models": await plane.status(state)}


@router.get(
    "/{name}/ready",
    summary="One model's readiness: 200 while it serves, else 503 and why (as KServe's)",
    openapi_extra=needs(INFERENCE),
)
async def model_ready(
    name: Annotated[str, Path(max_length=63, pattern=NAME_PATTERN)], state: StateDep
) -> Any:
    model = state.model(name)  # 403 for a key that may not use it, 404 if unknown
    if not state.status.refreshing:  # in-process (no refresh loop): read it now
        await state.status.refresh_if_older(READY_CACHE_S)
    status = state.status.models.get(model.name) or {}
    phase = str(status.get("phase") or Phase.PENDING.value)
    if phase in SERVING:
        return {"name": model.name, "ready": True, "phase": phase}
    reason = access.without_path(status.get("message"), model.spec.model_id)
    body = {"name": model.name, "ready": False, "phase": phase, "reason": reason}
    retry = {} if phase == Phase.FAILED.value else {"Retry-After": "2"}
    return JSONResponse(body, status_code=503, headers=retry)


@router.post(
    "/load",
    status_code=202,
    summary="Load (or update) a model; it becomes Ready or Failed",
    openapi_extra=needs(MODELS_ADMIN, sensitive=True),
)
async def load_model(
    state: StateDep,
    body: Annotated[
        LoadRequest,
        Body(
            openapi_examples={
                "spec": {
                    "value": {
                        "name": "demo-llm",
                        "modelId": "builtin:demo-llm",
                        "task": "text-generation",
                    }
                },
                "short": {
                    "value": {
                        "model_id": "ernie-3.5-turbo",
                        "device": "cuda:0",
                        "precision": "fp16",
                    }
                },
            }
        ),
    ],
) -> dict[str, Any]:
    model = await plane.load(state, body.model_dump(exclude_none=True))
    return {"name": model.name, "phase": "Loading", "status_url": "/v1/models/status"}


@router.post(
    "/unload",
    status_code=202,
    summary="Unload a model; its streams end with an error",
    openapi_extra=needs(MODELS_ADMIN, sensitive=True),
)
async def unload_model(state: StateDep, body: UnloadRequest) -> dict[str, Any]:
    await plane.unload(state, body.name)
    return {"name": body.name, "phase": "Unloading"}


ModelName = Annotated[str, Path(max_length=63, pattern=NAME_PATTERN)]


@router.post(
    "/{name}/switch",
    status_code=202,
    summary="Move traffic to another version (blue-green or canary) without dropping a "
    "request: it loads beside the old, gets traffic once Ready, the old drains and retires",
    openapi_extra=needs(MODELS_ADMIN, sensitive=True),
)
async def switch_version(name: ModelName, body: SwitchRequest, state: StateDep) -> Any:
    access.check_model(name)
    rollout = await state.rollouts.switch(name, body.version, body.strategy, body.weight)
    return _rollout_answer(name, rollout)


@router.post(
    "/{name}/rollback",
    status_code=202,
    summary="Go back to the versions and weights before the last switch",
    openapi_extra=needs(MODELS_ADMIN, sensitive=True),
)
async def rollback_version(name: ModelName, state: StateDep) -> Any:
    access.check_model(name)
    return _rollout_answer(name, await state.rollouts.rollback(name))


def _rollout_answer(name: str, rollout: Rollout) -> JSONResponse:
    body = {
        "name": name,
        "rollout": rollout.model_dump(mode="json"),
        "status_url": "/v1/models/status",
    }
    return JSONResponse(body, status_code=202, headers={"Location": "/v1/models/status"})
