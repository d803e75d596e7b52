"""kopf handlers: thin; each takes what it needs and calls `reconcile`.

Two kopf indexes keep every DifyModel and DifyIndex in memory, so each handler sees the
whole desired state without listing the API. Finalizers come with the delete handlers:
an object goes only after its Serve application is gone (and, for an index with
`reclaimPolicy: Delete`, its vectors).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError

from dify_operator import reconcile
from dify_operator.reclaim import reclaim_index
from dify_operator.settings import OperatorSettings
from dify_serving.control import RayDashboard, RayUnavailable
from dify_serving.manifests import explain
from dify_serving.render import model_app_names
from dify_serving.specs import Phase
from dify_serving.status import index_status as index_app_status

G, V = reconcile.GROUP, reconcile.VERSION
MODELS, INDEXES = "difymodels", "difyindexes"


@kopf.on.startup(errors=kopf.ErrorsMode.PERMANENT)
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Settings and Serve options, once: a bad setting stops the start (not every apply)."""
    config: OperatorSettings = memo.get("config") or OperatorSettings()
    memo.config = config
    if memo.get("options") is None:
        try:
            memo.options = reconcile.serve_options(config)
        except ValidationError as exc:
            raise kopf.PermanentError(f"bad setting: {explain(exc)}") from None
    memo.applier = memo.get("applier") or reconcile.Applier(
        memo.options, RayDashboard(config.ray_dashboard, timeout=10)
    )
    memo.refreshed = {}
    memo.apply_lock = memo.get("apply_lock") or threading.Lock()
    settings.persistence.finalizer = "difymirror.dev/finalizer"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 60
    settings.execution.max_workers = 4
    if config.peering:  # standalone or not is kopf.operator()'s argument (see __main__)
        settings.peering.name = config.peering
        settings.peering.mandatory = False  # without the peering CRD: run, with a warning


@kopf.index(G, V, MODELS)
def model_bodies(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {name: {"metadata": dict(body.metadata), "spec": dict(body.spec)}}


@kopf.index(G, V, INDEXES)
def index_bodies(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {name: {"metadata": dict(body.metadata), "spec": dict(body.spec)}}


def _bodies(index: kopf.Index[str, Any]) -> list[dict[str, Any]]:
    return [body for key in index for body in index[key]]


def _desired(
    memo: kopf.Memo, model_bodies: kopf.Index, index_bodies: kopf.Index
) -> tuple[reconcile.DesiredState, dict[str, str]]:
    return reconcile.desired_state(
        _bodies(model_bodies), _bodies(index_bodies), memo.options.qdrant_url
    )


def _apply(
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
    patch: kopf.Patch,
    generation: int | None,
) -> reconcile.DesiredState:
    """Apply the whole desired state; Reconciled condition either way.

    Computed and applied as one step under a lock: handlers run on several threads, and
    the kopf indexes are live, so the last apply is computed from the newest bodies. (Two
    indexes deleted together once left the first one's stale view, holding the second,
    applied last: an orphaned Serve application.)
    """
    try:
        with memo.apply_lock:
            state, _ = _desired(memo, model_bodies, index_bodies)
            memo.applier.apply(state)
    except RayUnavailable as exc:
        patch.status["conditions"] = reconcile.merge_conditions(
            None,
            [reconcile.condition("Reconciled", False, "RayUnavailable", str(exc))],
            generation,
        )
        raise kopf.TemporaryError(
            f"Ray unreachable: {exc}", delay=memo.config.retry_delay_s
        ) from None
    return state


def _reconciled(
    patch: kopf.Patch, status: kopf.Status, generation: int | None, message: str
) -> None:
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = reconcile.merge_conditions(
        status.get("conditions"),
        [reconcile.condition("Reconciled", True, "Applied", message)],
        generation,
    )


def _validate_and_apply(
    parse: Callable[[str, Any], Any],
    name: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
) -> None:
    """An invalid spec fails for good (with the message in status); else apply everything."""
    generation = meta.get("generation")
    try:
        parse(name, spec)
    except ValueError as exc:
        _failed(patch, status, generation, str(exc))
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise kopf.PermanentError(f"invalid spec: {exc}") from None
    _apply(memo, model_bodies, index_bodies, patch, generation)
    _reconciled(patch, status, generation, "Serve config applied")


@kopf.on.resume(G, V, MODELS)
@kopf.on.create(G, V, MODELS)
@kopf.on.update(G, V, MODELS, field="spec")
def model_changed(
    name: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
    **_: Any,
) -> None:
    _validate_and_apply(
        reconcile.parse_model,
        name,
        spec,
        meta,
        status,
        patch,
        body,
        memo,
        model_bodies,
        index_bodies,
    )
    if status.get("phase") in (None, Phase.PENDING.value, Phase.FAILED.value):
        patch.status["phase"] = Phase.LOADING.value
        patch.status["message"] = "Serve application deploying"
    memo.refreshed.pop(name, None)
    kopf.info(body, reason="Applied", message=f"Serve application model-{name} applied")


def _failed(patch: kopf.Patch, status: kopf.Status, generation: int | None, message: str) -> None:
    patch.status["phase"] = Phase.FAILED.value
    patch.status["message"] = message
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = reconcile.merge_conditions(
        status.get("conditions"),
        [
            reconcile.condition("Reconciled", False, "InvalidSpec", message),
            reconcile.condition("Ready", False, "InvalidSpec", message),
        ],
        generation,
    )


@kopf.on.delete(G, V, MODELS)
def model_deleted(
    name: str,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
    **_: Any,
) -> None:
    _apply(memo, model_bodies, index_bodies, patch, None)
    try:
        gone = not memo.applier.app_exists(name)
    except RayUnavailable as exc:
        raise kopf.TemporaryError(
            f"Ray unreachable: {exc}", delay=memo.config.retry_delay_s
        ) from None
    if not gone:
        raise kopf.TemporaryError("waiting for Serve to remove the application", delay=1)
    kopf.info(body, reason="Removed", message=f"Serve application model-{name} removed")


@kopf.timer(G, V, MODELS, interval=1.0, initial_delay=1.0)
def model_status(
    name: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
    **_: Any,
) -> None:
    if meta.get("deletionTimestamp") or not _due(memo, name, status.get("phase")):
        return
    try:
        model = reconcile.parse_model(name, spec)
    except ValueError:
        return  # Failed for good; model_changed said why
    try:
        apps = memo.applier.applications()
    except RayUnavailable:
        return  # the Reconciled condition says so after the next apply
    missing = [a for a in model_app_names(model) if a not in apps]
    if missing:  # drift: someone changed Serve behind our back
        memo.applier.last_hash = None
        _apply(memo, model_bodies, index_bodies, patch, meta.get("generation"))
        kopf.warn(body, reason="Drift", message=f"{missing[0]} was missing from Serve; re-applied")
        return
    fields = reconcile.model_status_fields(name, model.spec, apps, memo.config.gateway_url + "/v1")
    changes = reconcile.status_patch(status, fields, meta.get("generation"))
    for key, value in changes.items():
        patch.status[key] = value
    if "phase" in changes:
        kopf.info(body, reason=changes["phase"], message=fields["message"] or changes["phase"])


def _due(memo: kopf.Memo, key: str, phase: str | None) -> bool:
    """Refresh often while not Ready, slowly after."""
    period = (
        memo.config.ready_period_s if phase == Phase.READY.value else memo.config.status_period_s
    )
    now = time.monotonic()
    if now - memo.refreshed.get(key, 0.0) < period:
        return False
    memo.refreshed[key] = now
    return True


@kopf.on.resume(G, V, INDEXES)
@kopf.on.create(G, V, INDEXES)
@kopf.on.update(G, V, INDEXES, field="spec")
def index_changed(
    name: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
    **_: Any,
) -> None:
    _validate_and_apply(
        reconcile.parse_index,
        name,
        spec,
        meta,
        status,
        patch,
        body,
        memo,
        model_bodies,
        index_bodies,
    )
    memo.refreshed.pop(f"index/{name}", None)
    _index_status(name, spec, meta, status, patch, body, memo, model_bodies, index_bodies)


@kopf.timer(G, V, INDEXES, interval=1.0, initial_delay=1.0)
def index_status(
    name: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
    **_: Any,
) -> None:
    if meta.get("deletionTimestamp") or not _due(memo, f"index/{name}", status.get("phase")):
        return
    _index_status(name, spec, meta, status, patch, body, memo, model_bodies, index_bodies)


def _index_status(
    name: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
) -> None:
    try:
        index = reconcile.parse_index(name, spec)
    except ValueError:
        return
    state, invalid = _desired(memo, model_bodies, index_bodies)
    problem = invalid.get(f"index/{name}")  # e.g. a collection another index uses
    phases: dict[str, str] = {}
    app: dict[str, Any] | None = None
    try:
        apps = {} if problem else memo.applier.applications()
        phases = {
            n: reconcile.model_status_fields(n, m.spec, apps, "")["phase"]
            for n, m in state.models.items()
        }
        app = index_app_status(name, index.spec, state.models, apps)
    except RayUnavailable:
        pass
    fields, extra = reconcile.index_status_fields(index.spec, state.models, phases, app, problem)
    changes = reconcile.status_patch(status, fields, meta.get("generation"), extra)
    for key, value in changes.items():
        patch.status[key] = value
    if "phase" in changes:
        kopf.info(body, reason=changes["phase"], message=fields["message"])


@kopf.on.delete(G, V, INDEXES)
def index_deleted(
    name: str,
    spec: kopf.Spec,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    model_bodies: kopf.Index,
    index_bodies: kopf.Index,
    **_: Any,
) -> None:
    _apply(memo, model_bodies, index_bodies, patch, None)
    try:
        index = reconcile.parse_index(name, spec)
    except ValueError:
        return  # nothing was ever created for an invalid index
    qdrant_url = memo.options.qdrant_url
    users = reconcile.collection_users(name, index.spec, _bodies(index_bodies), qdrant_url)
    if index.spec.reclaim_policy == "Delete" and users:
        kopf.info(body, reason="Retained", message=f"vectors kept: {', '.join(users)} use them")
    elif index.spec.reclaim_policy == "Delete":
        removed = reclaim_index(name, index.spec, memo.config.home, qdrant_url)
        kopf.info(body, reason="Reclaimed", message=removed)
    else:
        kopf.info(body, reason="Retained", message="vectors kept (reclaimPolicy: Retain)")


@kopf.on.probe(id="applied_configs")
def applied_configs(memo: kopf.Memo, **_: Any) -> int:
    applier = memo.get("applier")
    return int(applier.applies) if applier else 0
