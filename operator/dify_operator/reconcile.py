"""Level-based reconciliation, as pure functions plus one small stateful applier.

Every event (create, update, resume, delete, timer) leads to the same thing: take *all*
DifyModel/DifyIndex objects the operator is responsible for (kopf indexes keep them in
memory), render the whole Serve config and apply it. Status is computed from Serve's
application status by `dify_serving.status`, the same code the gateway uses.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from dify_operator.settings import OperatorSettings
from dify_serving.control import RayDashboard
from dify_serving.manifests import DesiredState, explain
from dify_serving.options import ServeOptions
from dify_serving.render import model_app_name, render_serve_config
from dify_serving.specs import (
    DifyIndex,
    DifyIndexSpec,
    DifyModel,
    DifyModelSpec,
    Phase,
    shared_collection_message,
    shared_collections,
    store_key,
)
from dify_serving.status import model_status

GROUP, VERSION = "difymirror.dev", "v1alpha1"


def _parse(kind: type[Any], name: str, spec: Mapping[str, Any]) -> Any:
    """The whole object, metadata and spec, validated as a manifest's would be: Kubernetes
    accepts dotted names up to 253 characters, app names and paths do not."""
    try:
        return kind.model_validate({"metadata": {"name": name}, "spec": dict(spec)})
    except ValidationError as exc:
        raise ValueError(explain(exc)) from None


def parse_model(name: str, spec: Mapping[str, Any]) -> DifyModel:
    """A DifyModel from a body's spec; raises ValueError with a readable message."""
    model: DifyModel = _parse(DifyModel, name, spec)
    return model


def parse_index(name: str, spec: Mapping[str, Any]) -> DifyIndex:
    index: DifyIndex = _parse(DifyIndex, name, spec)
    return index


def _alive(bodies: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [b for b in bodies if not b.get("metadata", {}).get("deletionTimestamp")]


def desired_state(
    models: Iterable[Mapping[str, Any]],
    indexes: Iterable[Mapping[str, Any]],
    qdrant_url: str | None = None,
) -> tuple[DesiredState, dict[str, str]]:
    """Objects (bodies) → the desired state of the valid, living ones, and the invalid ones.

    Objects being deleted are left out: their apps must go before their finalizers do. An
    index whose collection another one (earlier by name) already uses is invalid; with
    `qdrant_url` set, embedded indexes share that server with `store.type: qdrant` ones.
    """
    state, invalid = DesiredState(), {}
    for body in sorted(_alive(models), key=lambda b: b["metadata"]["name"]):
        name = body["metadata"]["name"]
        try:
            state.models[name] = parse_model(name, body.get("spec") or {})
        except ValueError as exc:
            invalid[name] = str(exc)
    for body in sorted(_alive(indexes), key=lambda b: b["metadata"]["name"]):
        name = body["metadata"]["name"]
        try:
            state.indexes[name] = parse_index(name, body.get("spec") or {})
        except ValueError as exc:
            invalid[f"index/{name}"] = str(exc)
    specs = [(name, index.spec) for name, index in state.indexes.items()]
    for name, owner in shared_collections(specs, qdrant_url).items():
        invalid[f"index/{name}"] = shared_collection_message(name, owner, state.indexes[name].spec)
        del state.indexes[name]
    return state, invalid


def collection_users(
    name: str,
    spec: DifyIndexSpec,
    bodies: Iterable[Mapping[str, Any]],
    qdrant_url: str | None = None,
) -> list[str]:
    """Other living, valid indexes on the same collection as `name` (whose vectors a
    reclaim of `name` must then keep)."""
    key = store_key(name, spec, qdrant_url)
    users = []
    for body in _alive(bodies):
        other = body["metadata"]["name"]
        if other == name:
            continue
        try:
            index = parse_index(other, body.get("spec") or {})
        except ValueError:
            continue
        if store_key(other, index.spec, qdrant_url) == key:
            users.append(other)
    return sorted(users)


def serve_options(settings: OperatorSettings) -> ServeOptions:
    """The same options a local stack builds from the same environment, cluster-controlled.

    Built once, when the operator starts: a bad setting stops the start instead of failing
    every reconcile. Raises ValidationError naming the setting.
    """
    return settings.serve_options(control="kubernetes", dashboard_url=settings.ray_dashboard)


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# conditions ----------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, ok: bool | None, reason: str, message: str) -> dict[str, Any]:
    status = "Unknown" if ok is None else "True" if ok else "False"
    return {"type": kind, "status": status, "reason": reason, "message": message}


def merge_conditions(
    old: Iterable[Mapping[str, Any]] | None,
    new: Iterable[Mapping[str, Any]],
    generation: int | None,
) -> list[dict[str, Any]]:
    """Replace conditions by type; keep lastTransitionTime while the status holds."""
    merged = {c["type"]: dict(c) for c in old or []}
    for cond in new:
        previous = merged.get(cond["type"])
        stamp = (
            previous.get("lastTransitionTime")
            if previous and previous.get("status") == cond["status"]
            else None
        )
        merged[cond["type"]] = {
            **cond,
            "lastTransitionTime": stamp or _now(),
            **({"observedGeneration": generation} if generation is not None else {}),
        }
    return [merged[k] for k in sorted(merged)]


# status ---------------------------------------------------------------------------------
def model_status_fields(
    name: str, spec: DifyModelSpec, apps: Mapping[str, Any], endpoint: str
) -> dict[str, Any]:
    """Status fields of a model from Serve's applications (camelCase, for `.status`)."""
    s = model_status(name, spec, dict(apps))
    ready = s["phase"] == Phase.READY.value
    return {
        "phase": s["phase"],
        "readyReplicas": s["ready_replicas"],
        "message": s["message"],
        "reason": s.get("reason"),
        "loadProgress": s["load_progress"],
        "endpoint": endpoint if ready or s["phase"] == Phase.DEGRADED.value else None,
        "_ready": condition("Ready", ready, s.get("reason") or s["phase"], s["message"]),
        **({"versions": _versions(s["versions"])} if "versions" in s else {}),
    }


def _versions(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A versioned model's versions for `.status` (camelCase)."""
    return [
        {
            "name": v["name"],
            "weight": v["weight"],
            "phase": v.get("phase"),
            "readyReplicas": v.get("ready_replicas"),
        }
        for v in versions
    ]


def index_status_fields(
    spec: DifyIndexSpec,
    models: Mapping[str, DifyModel],
    model_phases: Mapping[str, str],
    app: Mapping[str, Any] | None = None,
    problem: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pending while the embedding model is missing or loading; then its own app's phase.

    Returns the status fields and the conditions besides Ready to set (`status_patch`).
    `problem` is why `desired_state` left a valid spec out (a shared collection): Failed,
    and not Reconciled either.
    """
    if problem is not None:
        fields = {
            "phase": Phase.FAILED.value,
            "message": problem,
            "_ready": condition("Ready", False, "InvalidSpec", problem),
        }
        return fields, [condition("Reconciled", False, "InvalidSpec", problem)]
    return _index_fields(spec, models, model_phases, app), []


def _index_fields(
    spec: DifyIndexSpec,
    models: Mapping[str, DifyModel],
    model_phases: Mapping[str, str],
    app: Mapping[str, Any] | None,
) -> dict[str, Any]:
    model = spec.embedding_model
    if model not in models:
        message = f"embedding model {model!r} does not exist"
        return {
            "phase": Phase.PENDING.value,
            "message": message,
            "_ready": condition("Ready", False, "EmbeddingModelMissing", message),
        }
    if models[model].spec.task != "feature-extraction":
        message = f"model {model!r} is {models[model].spec.task}, not feature-extraction"
        return {
            "phase": Phase.FAILED.value,
            "message": message,
            "_ready": condition("Ready", False, "WrongModelTask", message),
        }
    phase = model_phases.get(model, Phase.PENDING.value)
    if phase == Phase.READY.value and app is not None and app["phase"] != Phase.READY.value:
        return {
            "phase": app["phase"],
            "message": app["message"],
            "_ready": condition("Ready", False, "Index" + app["phase"], app["message"]),
        }
    ready = phase == Phase.READY.value
    message = f"embedding model {model!r} is {phase}"
    if phase == Phase.FAILED.value:
        phase = Phase.DEGRADED.value
    elif not ready:
        phase = Phase.PENDING.value
    return {
        "phase": phase,
        "message": message,
        "_ready": condition(
            "Ready", ready, "EmbeddingModel" + ("Ready" if ready else "NotReady"), message
        ),
    }


def status_patch(
    current: Mapping[str, Any] | None,
    fields: Mapping[str, Any],
    generation: int | None,
    extra_conditions: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The `.status` patch: fields plus merged conditions; {} when nothing changes."""
    current = dict(current or {})
    ready = fields.get("_ready")
    new = {k: v for k, v in fields.items() if not k.startswith("_")}
    conditions = [c for c in [ready, *extra_conditions] if c]
    if conditions:
        new["conditions"] = merge_conditions(current.get("conditions"), conditions, generation)
    changed = {k: v for k, v in new.items() if current.get(k) != v}
    return changed


# applying -------------------------------------------------------------------------------
@dataclass
class Applier:
    """Applies rendered configs to one Ray cluster; skips configs it already applied.

    `options` are built once at start (`serve_options`), never per apply.
    """

    options: ServeOptions
    dashboard: RayDashboard
    last_hash: str | None = None
    applies: int = 0
    _apps_cache: tuple[float, dict[str, Any]] = field(default=(0.0, {}))

    def apply(self, state: DesiredState) -> bool:
        """Render and PUT; returns True when Ray was changed. Raises RayUnavailable."""
        config = render_serve_config(state, self.options)
        digest = config_hash(config)
        if digest == self.last_hash:
            return False
        self.dashboard.put_applications(config)
        self.last_hash, self.applies = digest, self.applies + 1
        self._apps_cache = (0.0, {})
        return True

    def applications(self, max_age_s: float = 1.0) -> dict[str, Any]:
        """Serve's applications, cached briefly so N timers cost one GET."""
        stamp, apps = self._apps_cache
        if time.monotonic() - stamp > max_age_s:
            apps = self.dashboard.get_applications().get("applications") or {}
            self._apps_cache = (time.monotonic(), apps)
        return apps

    def app_exists(self, name: str) -> bool:
        """Whether any app of the model runs (its own, or one of a version's)."""
        app = model_app_name(name)
        return any(a == app or a.startswith(f"{app}.") for a in self.applications(max_age_s=0))
