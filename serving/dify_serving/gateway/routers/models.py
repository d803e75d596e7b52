"""Model management: list, status (with device and memory), load, unload."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import ValidationError

from dify_serving.engines import weights
from dify_serving.gateway import access
from dify_serving.gateway.errors import ApiError, describe_validation
from dify_serving.gateway.schemas import LoadRequest, ModelCard, ModelList, UnloadRequest
from dify_serving.gateway.state import GatewayState
from dify_serving.specs import (
    DifyModel,
    DifyModelSpec,
    ObjectMeta,
    is_local_model_id,
    name_from_model_id,
)

router = APIRouter(prefix="/v1/models", tags=["models"])


async def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


@router.get("", response_model=ModelList, summary="Models (OpenAI list shape, with phase)")
async def list_models(state: StateDep) -> ModelList:
    now = int(time.time())
    cards = [
        ModelCard(
            id=name,
            created=now,
            task=str(m.spec.task),
            model_id=access.shown_model_id(m.spec.model_id),
            phase=state.statuses.get(name, {}).get("phase", "Pending"),
        )
        for name, m in sorted(state.models().items())
        if access.may_use_model(name)
    ]
    return ModelList(data=cards)


@router.get("/status", summary="Per model: phase, replicas, device, precision, memory, GPUs")
async def models_status(state: StateDep) -> dict[str, Any]:
    statuses = await state.refresh_status()
    models = state.models()
    names = access.visible_models(statuses)
    infos = await asyncio.gather(*(state.info(n) for n in names))
    out = []
    for name, info in zip(names, infos, strict=True):
        spec = models[name].spec
        status = statuses[name]
        out.append(
            {
                **status,
                "message": access.without_path(status.get("message"), spec.model_id),
                "model_id": access.shown_model_id(spec.model_id),
                "task": str(spec.task),
                "device": info.get("device", spec.device),
                "precision": info.get("precision", str(spec.precision)),
                "resident_memory_bytes": info.get("resident_memory_bytes"),
                "parameters": info.get("parameters"),
                "gpus": info.get("gpus", []),
            }
        )
    return {"models": out}


def parse_load(body: dict[str, Any], roots: list[Path] | None = None) -> DifyModel:
    """A load body → a DifyModel; the short `{model_id, device, precision}` form too.

    A local modelId outside `roots` is refused here, by its text alone, with the same
    words whether or not the folder exists (the replica checks again before loading).
    """
    body = dict(body)
    name = body.pop("name", None)
    try:
        spec = DifyModelSpec.model_validate(body)
        if roots is not None and is_local_model_id(spec.model_id):
            weights.check_local(spec.model_id, roots, follow_links=False)
        name = name or name_from_model_id(spec.model_id)
        return DifyModel(metadata=ObjectMeta(name=name), spec=spec)
    except ValidationError as exc:
        raise ApiError(422, describe_validation(list(exc.errors())), "invalid_spec") from None
    except (ValueError, weights.WeightsNotFound) as exc:
        raise ApiError(422, str(exc), "invalid_spec") from None


@router.post(
    "/load", status_code=202, summary="Load (or update) a model; it becomes Ready or Failed"
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
    roots = weights.model_roots(Path(state.options.home), state.options.sources)
    model = parse_load(body.model_dump(exclude_none=True), roots)
    access.check_model(model.name)
    await state.load(model)
    return {"name": model.name, "phase": "Loading", "status_url": "/v1/models/status"}


@router.post("/unload", status_code=202, summary="Unload a model; its streams end with an error")
async def unload_model(state: StateDep, body: UnloadRequest) -> dict[str, Any]:
    access.check_model(body.name)
    await state.unload(body.name)
    return {"name": body.name, "phase": "Unloading"}
