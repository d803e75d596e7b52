"""Serve application status → the phase, readiness and reason users see.

Pure: takes the JSON of `GET /api/serve/applications/` and a spec, returns the status
dict that `GET /v1/models/status` shows and the operator writes into `.status`.
"""

from __future__ import annotations

import re
from typing import Any

from dify_serving.render import index_app_name, model_app_name
from dify_serving.specs import DifyIndexSpec, DifyModel, DifyModelSpec, Phase, Task

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Found|Long)[\w]*): (.+)$")

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


def app_status(app: dict[str, Any] | None, desired: int) -> dict[str, Any]:
    """Phase, replicas, message and progress of one Serve application (None: not applied)."""
    out: dict[str, Any] = {
        "phase": Phase.PENDING.value,
        "ready_replicas": 0,
        "desired_replicas": desired,
        "message": "not applied to Ray Serve yet",
        "load_progress": 0.0,
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
    if phase == Phase.FAILED:
        message = failure_reason(detail or message) or "failed to start"
    elif phase == Phase.READY and desired and ready < desired:
        phase = Phase.DEGRADED
        message = f"{ready} of {desired} replicas ready"
    else:
        message = _ANSI.sub("", detail or message)[:500]
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
    return out


def model_status(
    name: str,
    spec: DifyModelSpec,
    applications: dict[str, Any],
    cluster_gpus: float | None = None,
) -> dict[str, Any]:
    """The status of one model from the Serve applications map."""
    desired = spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas
    if spec.uses_cuda and cluster_gpus == 0:
        return {
            "name": name,
            **app_status(None, desired),
            "phase": Phase.FAILED.value,
            "message": f"device {spec.device} needs a GPU and the cluster has none",
        }
    return {"name": name, **app_status(applications.get(model_app_name(name)), desired)}


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
    return out
