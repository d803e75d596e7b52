"""Version switching: which versions of a model run, which take traffic, and the next step.

A `DifyModel` may hold several versions (`spec.versions`, each with a traffic weight; the
weights sum to 100). A switch (`POST /v1/models/{name}/switch`) writes a `Rollout` into
the spec: the weights to move to (`target`) and those it moves from (`previous`, what a
rollback goes back to). Then a level-based controller, `advance`, moves it on, one
idempotent step per look at the status:

1. **Loading.** Render runs the versions that carry traffic *and* the target's (with
   weight 0 until they are Ready): the new version loads beside the old, which keeps
   serving every request.
2. The target's versions are all Ready → the weights become the target's in one write
   (blue-green: all traffic at once; canary: its share). A version that failed → the
   switch is **Failed** with the reason; the weights never moved, and render drops it.
3. **Draining.** Versions that lost their traffic keep running until the gateways have
   seen the new weights and the requests they hold have finished (streams too): then
   render drops them (**Complete**).

Kubernetes Deployments and KServe's canary rollouts work the same way (new beside old,
traffic only to Ready, old retired after). The controller is pure so the gateway (one
machine: the local state file) and a cluster (the DifyModel, written by the gateway,
applied by the operator) run the same steps, and the tests drive it without Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dify_serving.specs import (
    DifyModel,
    DifyModelSpec,
    Phase,
    Rollout,
    RolloutPhase,
    SwitchStrategy,
)

#: Phases in which a version answers requests.
SERVING = frozenset({Phase.READY.value, Phase.DEGRADED.value})


def loaded_versions(spec: DifyModelSpec) -> list[str]:
    """The versions that have replicas now, in spec order: those with traffic, the
    target's while it loads, and the retired ones while they drain."""
    wanted = {v.name for v in spec.versions if v.weight > 0}
    rollout = spec.rollout
    if rollout is not None and rollout.phase == RolloutPhase.LOADING:
        wanted |= {name for name, weight in rollout.target.items() if weight > 0}
    if rollout is not None and rollout.phase == RolloutPhase.DRAINING:
        wanted |= set(rollout.draining)
    return [v.name for v in spec.versions if v.name in wanted]


def switch_target(
    spec: DifyModelSpec, version: str, strategy: SwitchStrategy, weight: int | None
) -> dict[str, int]:
    """The weights a switch moves to.

    Blue-green: all traffic to `version`. Canary: `weight` percent to it, the rest shared
    by the versions serving now in proportion to what they carry (largest remainder, so
    the weights stay whole numbers summing to 100).
    """
    if strategy == SwitchStrategy.BLUE_GREEN or weight == 100:
        return {version: 100}
    assert weight is not None
    others = {n: w for n, w in spec.weights().items() if n != version and w > 0}
    rest = 100 - weight
    if not others:
        raise ValueError(
            f"a canary needs another version serving beside {version!r}; none is: switch blue-green"
        )
    total = sum(others.values())
    shares = {n: rest * w / total for n, w in others.items()}
    out = {n: int(share) for n, share in shares.items()}
    left = rest - sum(out.values())
    for name in sorted(shares, key=lambda n: shares[n] - out[n], reverse=True)[:left]:
        out[name] += 1
    out = {n: w for n, w in out.items() if w > 0}
    return {version: weight, **out}


def start(
    spec: DifyModelSpec, target: dict[str, int], strategy: SwitchStrategy, now: float
) -> DifyModelSpec:
    """The spec with a new rollout towards `target` (from the weights serving now)."""
    current = {n: w for n, w in spec.weights().items() if w > 0}
    draining = list(spec.rollout.draining) if spec.rollout and spec.rollout.running else []
    rollout = Rollout(
        strategy=strategy,
        target=target,
        previous=current,
        phase=RolloutPhase.LOADING,
        draining=draining,
        changed_at=now,
        message=f"loading {', '.join(_names(target))}",
    )
    return spec.model_copy(update={"rollout": rollout})


def advance(
    model: DifyModel,
    versions: Mapping[str, Mapping[str, Any]],
    drained: Callable[[str], bool],
    now: float,
    drain_min_s: float,
    drain_max_s: float,
) -> DifyModelSpec | None:
    """The next step of the model's rollout, or None when there is none to take.

    Args:
        versions: each version's status (phase, message), as `versioned_status` reads it.
        drained: whether a retired version holds no request any more.
        drain_min_s: how long retired versions run at least (every gateway sees the new
            weights within it).
        drain_max_s: how long they run at most (the longest request allowed).
    """
    spec = model.spec
    rollout = spec.rollout
    if rollout is None or not rollout.running:
        return None
    if rollout.phase == RolloutPhase.LOADING:
        wanted = _names(rollout.target)
        failed = [n for n in wanted if _phase(versions, n) == Phase.FAILED.value]
        if failed:
            reason = versions[failed[0]].get("message") or "failed to load"
            serving = ", ".join(_names(spec.weights())) or "none"
            message = f"version {failed[0]} failed to load: {reason}; traffic stays on {serving}"
            return _with(spec, rollout, phase=RolloutPhase.FAILED, changed_at=now, message=message)
        if not all(_phase(versions, n) in SERVING for n in wanted):
            return None
        losing = [n for n, w in spec.weights().items() if w > 0 and rollout.target.get(n, 0) == 0]
        draining = sorted((set(rollout.draining) | set(losing)) - set(wanted))
        moved = [
            v.model_copy(update={"weight": rollout.target.get(v.name, 0)}) for v in spec.versions
        ]
        spec = spec.model_copy(update={"versions": moved})
        if not draining:
            return _complete(spec, rollout, now)
        message = f"traffic moved; draining {', '.join(draining)}"
        return _with(
            spec,
            rollout,
            phase=RolloutPhase.DRAINING,
            changed_at=now,
            draining=draining,
            message=message,
        )
    since = now - (rollout.changed_at or 0.0)
    if since < drain_min_s:
        return None
    if since < drain_max_s and not all(drained(n) for n in rollout.draining):
        return None
    return _complete(spec, rollout, now)


def versioned_status(
    spec: DifyModelSpec, per_version: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    """A versioned model's own status from its versions': the versions with traffic decide.

    Ready when all of them serve, Failed when all failed, Degraded when some serve and
    some do not; otherwise the phase of the first one (Loading, Pending).
    """
    weights = spec.weights()
    live = [n for n, w in weights.items() if w > 0]
    phases = [per_version[n]["phase"] for n in live if n in per_version]
    first = per_version[live[0]] if live and live[0] in per_version else {}
    out: dict[str, Any] = {
        "phase": first.get("phase", Phase.PENDING.value),
        "ready_replicas": sum(
            per_version[n].get("ready_replicas", 0) for n in live if n in per_version
        ),
        "desired_replicas": sum(
            per_version[n].get("desired_replicas", 0) for n in live if n in per_version
        ),
        "message": first.get("message"),
        "load_progress": first.get("load_progress", 0.0),
    }
    if phases and all(p in SERVING for p in phases):
        out.update(
            phase=Phase.READY.value
            if all(p == Phase.READY.value for p in phases)
            else Phase.DEGRADED.value,
            load_progress=1.0,
        )
        out["message"] = out["phase"]
    elif phases and any(p in SERVING for p in phases):
        bad = next(n for n in live if per_version.get(n, {}).get("phase") not in SERVING)
        out.update(
            phase=Phase.DEGRADED.value, message=f"version {bad}: {per_version[bad].get('message')}"
        )
    elif phases and all(p == Phase.FAILED.value for p in phases):
        out.update(phase=Phase.FAILED.value)
    rollout = spec.rollout
    out["versions"] = [
        {
            "name": v.name,
            "weight": v.weight,
            **{
                k: per_version.get(v.name, {}).get(k)
                for k in ("phase", "ready_replicas", "message")
            },
        }
        for v in spec.versions
    ]
    if rollout is not None:
        out["rollout"] = rollout.model_dump(mode="json", by_alias=False)
    return out


def _names(weights: Mapping[str, int]) -> list[str]:
    return [n for n, w in weights.items() if w > 0]


def _phase(versions: Mapping[str, Mapping[str, Any]], name: str) -> str:
    return str(versions.get(name, {}).get("phase") or Phase.PENDING.value)


def _complete(spec: DifyModelSpec, rollout: Rollout, now: float) -> DifyModelSpec:
    shares = ", ".join(f"{n} {w}%" for n, w in rollout.target.items() if w > 0)
    return _with(
        spec,
        rollout,
        phase=RolloutPhase.COMPLETE,
        changed_at=now,
        draining=[],
        message=f"switched: {shares}",
    )


def _with(spec: DifyModelSpec, rollout: Rollout, **changes: Any) -> DifyModelSpec:
    return spec.model_copy(update={"rollout": rollout.model_copy(update=changes)})
