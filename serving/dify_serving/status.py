"""Serve application status → the phase, readiness and reason users see.

Pure: takes the JSON of `GET /api/serve/applications/` and a spec (and, where the caller
can read them, the cluster's free resources), returns the status dict that
`GET /v1/models/status` shows and the operator writes into `.status`.

A replica that Ray cannot place reads `Pending` with reason `Unschedulable`, what one
replica needs and what the cluster has free. Serve shows such a replica as `STARTING`
with no process yet (`pid` null) and, after 30 s, says so in the deployment's message;
a caller that passes `free` (the gateway and `LocalStack` read
`ray.available_resources()`) sees it within `PLACEMENT_GRACE_S`: a replica has waited
that long for a process and what it needs does not fit what is free.
A model scaled to zero (`autoscaling.minReplicas: 0`, idle past `idleTimeoutS`) is
Ready with no replicas and `scaled_to_zero: true`; its first request wakes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from dify_serving.render import index_app_name, model_app_name
from dify_serving.rollout import loaded_versions, versioned_status
from dify_serving.specs import DifyIndexSpec, DifyModel, DifyModelSpec, Phase, Task

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Found|Long)[\w]*): (.+)$")

#: Serve's deployment message for replicas that wait for resources (after 30 s).
_UNSCHEDULED = re.compile(
    r"taken more than \S+ to be scheduled.*?Resources required for each replica: "
    r"(?P<needs>\{.*?\}|\[.*?\]), total resources available: (?P<free>\{.*?\})",
    re.DOTALL,
)
#: Replica states in which a replica is being started (placed, then initialised).
_STARTING = ("STARTING", "UPDATING", "RECOVERING")
#: Resources a replica asks Ray for that `needs`/`free` show (Ray's own names).
SCHEDULED_RESOURCES = ("CPU", "GPU")
UNSCHEDULABLE = "Unschedulable"
#: Seconds a replica waits for a process before `free` is compared with what it needs:
#: a replica whose resources Ray already reserved shows no process either until its
#: worker has started (a second or two), and must not read as unschedulable meanwhile.
PLACEMENT_GRACE_S = 5.0

_PHASES = {
    "RUNNING": Phase.READY,
    "DEPLOYING": Phase.LOADING,
    "NOT_STARTED": Phase.PENDING,
    "DEPLOY_FAILED": Phase.FAILED,
    "UNHEALTHY": Phase.DEGRADED,
    "DELETING": Phase.PENDING,
}


def failure_reason(message: str) -> str:
    """The user's exception out of a Serve message that embeds a traceback."""
    text = _ANSI.sub("", message or "").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line)
        if match:
            kind = match.group(1).rsplit(".", 1)[-1]
            return f"{kind}: {match.group(3)}"
    return lines[0][:500] if lines else ""


def awaiting_placement(app: Mapping[str, Any] | None) -> int:
    """Replicas of an application that Ray has not given a process yet."""
    return sum(
        1
        for d in ((app or {}).get("deployments") or {}).values()
        for r in d.get("replicas") or []
        if r.get("state") in _STARTING and r.get("pid") is None
    )


def _amounts(resources: Mapping[str, Any], keys: Any = SCHEDULED_RESOURCES) -> dict[str, float]:
    return {k: float(resources.get(k) or 0) for k in keys}


def _fits(needs: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(v <= float(free.get(k) or 0) + 1e-9 for k, v in needs.items() if v > 0)


def _describe(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if v or k == "CPU"}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) or "nothing"


def unschedulable(
    app: Mapping[str, Any] | None,
    free: Mapping[str, float] | None = None,
    now: float | None = None,
) -> dict[str, Any] | None:
    """`{needs, free}` when a replica of `app` waits for resources Ray does not have.

    With `free` (the cluster's available resources, read with `app`) and `now` (epoch
    seconds): a replica without a process for `PLACEMENT_GRACE_S` whose needs do not fit.
    Without them: Serve's own message, written once a replica has waited 30 s.
    """
    if not awaiting_placement(app):
        return None
    deployments = list(((app or {}).get("deployments") or {}).values())
    for d in deployments:  # Serve's message outlives the wait: only while a replica waits
        match = _UNSCHEDULED.search(_ANSI.sub("", d.get("message") or ""))
        if match:
            try:
                needs, available = json.loads(match["needs"]), json.loads(match["free"])
            except ValueError:
                continue
            if isinstance(needs, list):  # placement-group bundles: the largest one
                needs = max(needs, key=lambda b: float(b.get("CPU", 0)), default={})
            keys = [k for k in SCHEDULED_RESOURCES if k in needs] or list(SCHEDULED_RESOURCES)
            wanted, left = _amounts(needs, keys), _amounts(available, keys)
            out: dict[str, Any] = {"needs": wanted, "free": left}
            if _fits(wanted, left):  # free in all, on no single node
                out["note"] = "no single node has that free"
            return out
    if free is None or now is None:
        return None
    for d in deployments:
        waiting = [
            r
            for r in d.get("replicas") or []
            if r.get("state") in _STARTING
            and r.get("pid") is None
            and 0 < float(r.get("start_time_s") or 0) <= now - PLACEMENT_GRACE_S
        ]
        required = d.get("required_resources") or {}
        if waiting and required:
            needs = {k: float(required.get(k) or 0) for k in SCHEDULED_RESOURCES}
            needs = {k: v for k, v in needs.items() if v or k == "CPU"}
            if not _fits(needs, free):
                return {"needs": needs, "free": _amounts(free, needs)}
    return None


def app_status(
    app: dict[str, Any] | None,
    desired: int,
    free: Mapping[str, float] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Phase, replicas, message and progress of one Serve application (None: not applied).

    `free`, `now`: the cluster's available resources (`ray.available_resources()`) and
    the time they were read, when the caller can read them: an unschedulable replica is
    then seen after `PLACEMENT_GRACE_S`, without them after Serve's 30 s.
    """
    out: dict[str, Any] = {
        "phase": Phase.PENDING.value,
        "reason": None,
        "ready_replicas": 0,
        "desired_replicas": desired,
        "message": "not applied to Ray Serve yet",
        "load_progress": 0.0,
        "scaled_to_zero": False,
    }
    if app is None:
        return out
    deployments = list((app.get("deployments") or {}).values())
    ready = sum(
        1 for d in deployments for r in d.get("replicas") or [] if r.get("state") == "RUNNING"
    )
    for d in deployments:
        desired = d.get("target_num_replicas", desired)
    phase = _PHASES.get(app.get("status", ""), Phase.PENDING)
    message = app.get("message") or ""
    detail = next((d.get("message") for d in deployments if d.get("message")), "")
    # an autoscaled deployment adding replicas (waking from zero too) is not degraded
    scaling = any(d.get("status") == "UPSCALING" for d in deployments)
    if phase == Phase.FAILED:
        message = failure_reason(detail or message) or "failed to start"
    elif phase == Phase.READY and desired and ready < desired and scaling:
        message = f"scaling up: {ready} of {desired} replicas ready"
    elif phase == Phase.READY and desired and ready < desired:
        phase = Phase.DEGRADED
        message = f"{ready} of {desired} replicas ready"
    else:
        message = _ANSI.sub("", detail or message)[:500]
    blocked = unschedulable(app, free, now) if phase != Phase.FAILED and not ready else None
    if blocked is not None:
        phase = Phase.PENDING
        note = blocked.pop("note", None)
        out.update(reason=UNSCHEDULABLE, **blocked)
        message = (
            f"unschedulable: a replica needs {_describe(blocked['needs'])}, the cluster has "
            f"{_describe(blocked['free'])} free{f' ({note})' if note else ''}; lower "
            "resources.cpus, unload a model or add capacity (on one machine: "
            "DIFY_MIRROR_CPU_OVERCOMMIT)"
        )
    out.update(
        phase=phase.value,
        ready_replicas=ready,
        desired_replicas=desired,
        message=message or phase.value,
        load_progress=1.0
        if phase == Phase.READY
        else round(ready / desired, 2)
        if desired
        else 1.0,
    )
    if phase == Phase.READY and not desired and not ready:
        out.update(scaled_to_zero=True, message="scaled to zero; the next request wakes it")
    return out


#: Seconds requests must keep waiting in a replica before the status hints at it.
WAITING_HINT_AFTER_S = 10.0


def concurrency_hint(
    spec: DifyModelSpec, waiting: float | None, since: float | None, now: float
) -> tuple[float | None, str | None]:
    """`(since, hint)`: since when requests have been seen waiting in the model's replicas
    (None: none wait now), and the documentation's "adjust concurrency" once they have
    kept waiting for `WAITING_HINT_AFTER_S`. The caller keeps `since` between reads."""
    if not waiting:
        return None, None
    since = now if since is None else since
    if now - since < WAITING_HINT_AFTER_S:
        return since, None
    replicas = (
        f"autoscaling.maxReplicas (now {spec.autoscaling.max_replicas})"
        if spec.autoscaling
        else f"replicas (now {spec.replicas})"
    )
    return since, (
        f"{waiting:g} requests have kept waiting for {now - since:.0f} s: adjust concurrency "
        f"by raising {replicas}, or batching.maxBatchSize (now {spec.batching.max_batch_size}) "
        "where memory allows; batching.maxConcurrentRequests "
        f"(now {spec.batching.max_concurrent_requests}) bounds what one replica takes"
    )


def model_status(
    name: str,
    spec: DifyModelSpec,
    applications: dict[str, Any],
    cluster_gpus: float | None = None,
    free: Mapping[str, float] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The status of one model from the Serve applications map (`free`, `now`: see
    `app_status`)."""
    # a model that may scale to zero starts one replica (render.autoscaling_config)
    desired = max(1, spec.autoscaling.min_replicas) if spec.autoscaling else spec.replicas
    if spec.uses_cuda and cluster_gpus == 0:
        return {
            "name": name,
            **app_status(None, desired),
            "phase": Phase.FAILED.value,
            "message": f"device {spec.device} needs a GPU and the cluster has none",
        }
    if spec.versions:  # one app per loaded version; the versions with traffic decide
        per_version = {
            v: app_status(applications.get(model_app_name(name, v)), desired, free, now)
            for v in loaded_versions(spec)
        }
        return {"name": name, **versioned_status(spec, per_version)}
    app = applications.get(model_app_name(name))
    return {"name": name, **app_status(app, desired, free, now)}


def index_status(
    name: str,
    spec: DifyIndexSpec,
    models: dict[str, DifyModel],
    applications: dict[str, Any],
) -> dict[str, Any]:
    """The status of one index: Pending while its embedding model is missing."""
    model = models.get(spec.embedding_model)
    out = {"name": name, **app_status(applications.get(index_app_name(name)), 1)}
    if model is None:
        out.update(message=f"embedding model {spec.embedding_model!r} does not exist")
    elif model.spec.task != Task.FEATURE_EXTRACTION:
        out.update(
            phase=Phase.FAILED.value,
            message=f"model {spec.embedding_model!r} is {model.spec.task}, not feature-extraction",
        )
    elif model.spec.versions:
        out.update(
            phase=Phase.FAILED.value,
            message=f"model {spec.embedding_model!r} has versions: an index embeds with a "
            "model of one version (a switch would change the vectors it stores)",
        )
    return out
