"""Serve application status → the phase, readiness and reason users see.

Pure: takes the JSON of `GET /api/serve/applications/` and a spec, returns the status
dict that `GET /v1/models/status` shows and the operator writes into `.status`.
"""

from __future__ import annotations

import re
from typing import Any

from dify_serving.render import model_app_name
from dify_serving.specs import DifyModelSpec, Phase

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


def model_status(
    name: str,
    spec: DifyModelSpec,
    applications: dict[str, Any],
    cluster_gpus: float | None = None,
) -> dict[str, Any]:
    """The status of one model from the Serve applications map."""
    app = applications.get(model_app_name(name))
    desired = spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas
    out: dict[str, Any] = {
        "name": name,
        "phase": Phase.PENDING.value,
        "ready_replicas": 0,
        "desired_replicas": desired,
        "message": "not applied to Ray Serve yet",
        "load_progress": 0.0,
    }
    if spec.uses_cuda and cluster_gpus == 0:
        out.update(
            phase=Phase.FAILED.value,
            message=f"device {spec.device} needs a GPU and the cluster has none",
        )
        return out
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
