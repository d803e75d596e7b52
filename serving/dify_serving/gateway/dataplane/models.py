"""Models: the list and status a key may see, load and unload."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dify_serving.engines import runtimes, weights
from dify_serving.gateway import access
from dify_serving.gateway.errors import ApiError, describe_validation
from dify_serving.gateway.state import GatewayState
from dify_serving.rollout import loaded_versions
from dify_serving.specs import (
    DifyModel,
    DifyModelSpec,
    ObjectMeta,
    is_local_model_id,
    name_from_model_id,
)


def visible(state: GatewayState) -> list[tuple[str, DifyModel, str]]:
    """(name, model, phase) of every model the key may use, by name."""
    statuses = state.status.models
    return [
        (name, m, statuses.get(name, {}).get("phase", "Pending"))
        for name, m in sorted(state.catalog.models().items())
        if access.may_use_model(name)
    ]


async def status(state: GatewayState) -> list[dict[str, Any]]:
    """Per model the key may see: phase, replicas, device, precision, memory, GPUs."""
    statuses = await state.status.refresh()
    models = state.catalog.models()
    names = access.visible_models(statuses)
    infos = await asyncio.gather(*(_info(state, models[n]) for n in names))
    out = []
    for name, info in zip(names, infos, strict=True):
        spec = models[name].spec
        status = statuses[name]
        if "versions" in status:  # each loaded version's own requests
            for version in status["versions"]:
                version["active_requests"] = info.get("by_version", {}).get(version["name"])
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
                "engine": info.get("engine", str(spec.engine)),
                "engine_note": info.get("engine_note"),
                # requests the engine is running or has queued (engines that count them)
                "active_requests": info.get("active_requests"),
                "running_requests": info.get("running_requests"),
                "waiting_requests": info.get("waiting_requests"),
                "hint": state.status.waiting_hint(name, spec, info.get("waiting_requests")),
            }
        )
    return out


async def _info(state: GatewayState, model: DifyModel) -> dict[str, Any]:
    """The replica's `info()`; for a versioned model, that of its first loaded version
    with the requests of all of them (`by_version` says each one's)."""
    if not model.spec.versions:
        return await state.model_replicas.info(model.name)
    versions = loaded_versions(model.spec)
    infos = await asyncio.gather(
        *(state.model_replicas.info(f"{model.name}@{v}") for v in versions)
    )
    by_version = {v: i.get("active_requests") for v, i in zip(versions, infos, strict=True)}
    merged = next((i for i in infos if i), {})
    counted = [n for n in by_version.values() if n is not None]
    return {
        **merged,
        "active_requests": sum(counted) if counted else None,
        "by_version": by_version,
    }


def parse_load(body: dict[str, Any], roots: list[Path] | None = None) -> DifyModel:
    """A load body → a DifyModel; the short `{model_id, device, precision}` form too.

    A local modelId outside `roots` is refused here, by its text alone, with the same
    words whether or not the folder exists (the replica checks again before loading).
    """
    body = dict(body)
    name = body.pop("name", None)
    if "rollout" in body:
        raise ApiError(
            422,
            "invalid_spec",
            "rollout: written by POST /v1/models/{name}/switch, not by a load",
        )
    try:
        spec = DifyModelSpec.model_validate(body)
        if roots is not None:  # the model's weights, and every version's
            for model_id in (spec.model_id, *(v.model_id for v in spec.versions)):
                if is_local_model_id(model_id):
                    weights.check_local(model_id, roots, follow_links=False)
        name = name or name_from_model_id(spec.model_id)
        runtimes.resolve(spec)  # 422 naming the extra when that engine is not installed
        return DifyModel(metadata=ObjectMeta(name=name), spec=spec)
    except ValidationError as exc:
        raise ApiError(422, "invalid_spec", describe_validation(list(exc.errors()))) from None
    except (ValueError, weights.WeightsNotFound) as exc:
        raise ApiError(422, "invalid_spec", str(exc)) from None


async def load(state: GatewayState, body: dict[str, Any]) -> DifyModel:
    """Validate a load body and put the model in the catalog; it becomes Ready or Failed."""
    roots = weights.model_roots(Path(state.options.home), state.options.sources)
    model = parse_load(body, roots)
    access.check_model(model.name)
    await state.load(model)
    return model


async def unload(state: GatewayState, name: str) -> None:
    """Remove the model; its streams end with `model_unloaded`."""
    access.check_model(name)
    await state.unload(name)
