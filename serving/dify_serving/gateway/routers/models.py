"""Model management: list, status (with device and memory), load, unload."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body

from dify_serving.gateway import access
from dify_serving.gateway.dataplane import models as plane
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import StateDep
from dify_serving.gateway.schemas import LoadRequest, ModelCard, ModelList, UnloadRequest
from dify_serving.security.grants import INFERENCE, MODELS_ADMIN

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
