"""Version switching without Ray: the pure controller (`rollout.py`), what render runs at
each step, and the gateway's routes over stand-in replicas of two versions."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from support import AUTH, model_doc

from dify_serving.catalog.files import LocalStateStore
from dify_serving.engines.protocol import Generation
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.manifests import parse_documents
from dify_serving.options import GatewayOptions, SecurityOptions, ServeOptions
from dify_serving.render import model_app_name, render_serve_config
from dify_serving.rollout import advance, loaded_versions, start, switch_target, versioned_status
from dify_serving.specs import DifyModel, DifyModelSpec, RolloutPhase, SwitchStrategy

READY = {"phase": "Ready", "ready_replicas": 1, "desired_replicas": 1, "message": "Ready"}
LOADING = {"phase": "Loading", "ready_replicas": 0, "desired_replicas": 1, "message": "loading"}
FAILED = {"phase": "Failed", "ready_replicas": 0, "desired_replicas": 1, "message": "OSError: no"}


def versioned(weights: dict[str, int]) -> DifyModel:
    versions = [{"name": n, "modelId": f"org/{n}", "weight": w} for n, w in weights.items()]
    doc = model_doc("m", "org/base", "text-generation", versions=versions)
    return parse_documents([doc]).models["m"]


def step(model: DifyModel, versions: dict[str, dict[str, Any]], **kw: Any) -> DifyModel:
    spec = advance(
        model,
        versions,
        kw.get("drained", lambda v: True),
        kw.get("now", 100.0),
        kw.get("drain_min_s", 1.0),
        kw.get("drain_max_s", 60.0),
    )
    assert spec is not None, "expected a step"
    return model.model_copy(update={"spec": spec})


# the controller ----------------------------------------------------------------------------
def test_blue_green_loads_beside_moves_when_ready_then_drains_and_retires() -> None:
    model = versioned({"v1": 100, "v2": 0})
    assert loaded_versions(model.spec) == ["v1"]
    target = switch_target(model.spec, "v2", SwitchStrategy.BLUE_GREEN, None)
    model = model.model_copy(
        update={"spec": start(model.spec, target, SwitchStrategy.BLUE_GREEN, 90.0)}
    )
    assert loaded_versions(model.spec) == ["v1", "v2"]  # the new beside the old
    assert model.spec.weights() == {"v1": 100, "v2": 0}  # no traffic to it yet
    assert advance(model, {"v1": READY, "v2": LOADING}, lambda v: True, 100, 1, 60) is None
    model = step(model, {"v1": READY, "v2": READY}, now=100.0)
    rollout = model.spec.rollout
    assert rollout is not None and rollout.phase == RolloutPhase.DRAINING
    assert model.spec.weights() == {"v1": 0, "v2": 100} and rollout.draining == ["v1"]
    assert loaded_versions(model.spec) == ["v1", "v2"]  # v1 finishes what it holds
    ready = {"v1": READY, "v2": READY}
    # not before every gateway saw the weights, nor while v1 still runs a request
    assert advance(model, ready, lambda v: True, 100.5, 1, 60) is None
    assert advance(model, ready, lambda v: False, 130, 1, 60) is None
    model = step(model, ready, now=130.0)
    assert model.spec.rollout is not None and model.spec.rollout.phase == RolloutPhase.COMPLETE
    assert loaded_versions(model.spec) == ["v2"]
    # a request that never ends does not hold the old version forever
    held = versioned({"v1": 100, "v2": 0})
    held = held.model_copy(
        update={"spec": start(held.spec, {"v2": 100}, SwitchStrategy.BLUE_GREEN, 0.0)}
    )
    held = step(held, ready, now=1.0)
    assert step(held, ready, now=62.0, drained=lambda v: False).spec.rollout.phase == "Complete"  # type: ignore[union-attr]


def test_a_version_that_fails_never_gets_traffic_and_the_switch_says_why() -> None:
    model = versioned({"v1": 100, "v2": 0})
    model = model.model_copy(
        update={"spec": start(model.spec, {"v2": 100}, SwitchStrategy.BLUE_GREEN, 0.0)}
    )
    model = step(model, {"v1": READY, "v2": FAILED})
    rollout = model.spec.rollout
    assert rollout is not None and rollout.phase == RolloutPhase.FAILED
    assert rollout.message == "version v2 failed to load: OSError: no; traffic stays on v1"
    assert model.spec.weights() == {"v1": 100, "v2": 0}
    assert loaded_versions(model.spec) == ["v1"]  # the failed one is dropped


def test_canary_shares_the_rest_in_proportion_and_whole_numbers() -> None:
    spec = versioned({"a": 70, "b": 30, "c": 0}).spec
    assert switch_target(spec, "c", SwitchStrategy.CANARY, 10) == {"c": 10, "a": 63, "b": 27}
    spec = versioned({"a": 50, "b": 50, "c": 0}).spec
    target = switch_target(spec, "c", SwitchStrategy.CANARY, 25)
    assert sum(target.values()) == 100 and target["c"] == 25 and abs(target["a"] - target["b"]) == 1
    assert switch_target(spec, "c", SwitchStrategy.CANARY, 100) == {"c": 100}
    lone = versioned({"a": 100, "b": 0}).spec
    with pytest.raises(ValueError, match="switch blue-green"):
        switch_target(lone, "a", SwitchStrategy.CANARY, 10)


def test_a_canary_moves_without_draining_anyone() -> None:
    model = versioned({"v1": 100, "v2": 0})
    target = switch_target(model.spec, "v2", SwitchStrategy.CANARY, 10)
    model = model.model_copy(update={"spec": start(model.spec, target, SwitchStrategy.CANARY, 0)})
    model = step(model, {"v1": READY, "v2": READY})
    assert model.spec.weights() == {"v1": 90, "v2": 10}
    assert model.spec.rollout is not None and model.spec.rollout.phase == "Complete"


def test_render_runs_one_app_per_loaded_version_with_its_own_weights() -> None:
    model = versioned({"v1": 100, "v2": 0})
    model = model.model_copy(
        update={"spec": start(model.spec, {"v2": 100}, SwitchStrategy.BLUE_GREEN, 0.0)}
    )
    state = parse_documents([])
    state.models["m"] = model
    apps = {a["name"]: a for a in render_serve_config(state, ServeOptions())["applications"]}
    assert model_app_name("m", "v1") == "model-m.v1"
    assert {"model-m.v1", "model-m.v2"} <= set(apps) and "model-m" not in apps
    args = apps["model-m.v2"]["args"]
    assert args["version"] == "v2" and args["spec"]["modelId"] == "org/v2"
    assert not args["spec"].get("versions") and not args["spec"].get("rollout")
    plain = parse_documents([model_doc("p", "org/p", "text-generation")])
    config = render_serve_config(plain, ServeOptions())
    assert (
        "version" not in next(a for a in config["applications"] if a["name"] == "model-p")["args"]
    )


def test_a_versioned_models_status_comes_from_the_versions_with_traffic() -> None:
    spec = versioned({"v1": 90, "v2": 10}).spec
    assert versioned_status(spec, {"v1": READY, "v2": READY})["phase"] == "Ready"
    some = versioned_status(spec, {"v1": READY, "v2": FAILED})
    assert some["phase"] == "Degraded" and "version v2" in some["message"]
    assert [v["name"] for v in some["versions"]] == ["v1", "v2"]
    loading = versioned_status(versioned({"v1": 100, "v2": 0}).spec, {"v1": LOADING})
    assert loading["phase"] == "Loading"
    assert loading["versions"][1]["phase"] is None  # declared, not loaded


# the gateway -------------------------------------------------------------------------------
class Replica:
    """One version's stand-in replica: answers with its version's name; `info()` says
    how many requests it runs (`active`)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.active = 0

    def __getattr__(self, method: str) -> Any:
        replica = self

        class Method:
            def remote(self, *args: Any) -> Any:
                if method == "info":
                    return replica._info()
                return replica._generate()

        return Method()

    async def _info(self) -> dict[str, Any]:
        return {"active_requests": self.active}

    async def _generate(self) -> Generation:
        await asyncio.sleep(0)
        return Generation(self.version, "stop", 1, 1)


class Dashboard:
    """Records what the gateway applies to Serve."""

    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []

    async def put_applications(self, config: dict[str, Any]) -> None:
        self.applied.append(config)

    def apps(self) -> list[str]:
        """The model apps of the last config applied."""
        applications = self.applied[-1]["applications"]
        return sorted(a["name"] for a in applications if a["name"].startswith("model-"))


class Gateway:
    def __init__(self, home: Path, weights: dict[str, int]) -> None:
        options = GatewayOptions(home=str(home), security=SecurityOptions())
        self.model = versioned(weights)
        state = parse_documents([])
        state.models["m"] = self.model
        LocalStateStore(home).save(state, ServeOptions(gateway=options))
        self.state = GatewayState(options)
        self.dashboard = Dashboard()
        self.state.catalog.dashboard = self.dashboard  # type: ignore[attr-defined]
        self.replicas = {v: Replica(v) for v in weights}
        for version, replica in self.replicas.items():
            self.state.model_replicas._handles[model_app_name("m", version)] = replica
        self.app = create_app(self.state)
        self.http = TestClient(self.app, headers=AUTH, raise_server_exceptions=False)
        self.statuses: dict[str, dict[str, Any]] = {v: READY for v in weights}
        self.publish()

    def spec(self) -> DifyModelSpec:
        return self.state.catalog.models()["m"].spec

    def publish(self) -> None:
        """What the status refresh would read from Serve for the versions loaded now."""
        spec = self.spec()
        per_version = {v: self.statuses[v] for v in loaded_versions(spec)}
        self.state.status.models = {"m": {"name": "m", **versioned_status(spec, per_version)}}
        self.state.status._index_targets()

    def tick(self) -> None:
        self.publish()
        asyncio.run(self.state.rollouts.tick())
        self.publish()

    def infer(self, model: str = "m") -> Any:
        return self.http.post("/v1/inference", json={"model": model, "prompt": "hi"})


@pytest.fixture()
def gw(tmp_path: Path) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path, {"v1": 100, "v2": 0, "v3": 0})
    try:
        yield gateway
    finally:
        gateway.app.state.guard.close()


def test_responses_say_which_version_served_them(gw: Gateway) -> None:
    r = gw.infer()
    assert r.status_code == 200, r.text
    assert r.headers["x-dify-model-version"] == "v1"
    assert r.json()["model"] == "m@v1" and r.json()["output"] == "v1"
    pinned = gw.infer("m@v1")
    assert pinned.status_code == 200 and pinned.headers["x-dify-model-version"] == "v1"
    for ref, needle in (("m@v9", "no version 'v9'"), ("m@v2", "not loaded")):
        missing = gw.infer(ref)
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["code"] == "version_not_found"
        assert needle in missing.json()["error"]["message"]


def test_a_blue_green_switch_through_the_api(gw: Gateway) -> None:
    r = gw.http.post("/v1/models/m/switch", json={"version": "v2"})
    assert r.status_code == 202, r.text
    assert r.json()["rollout"]["phase"] == "Loading" and r.json()["rollout"]["target"] == {
        "v2": 100
    }
    assert gw.dashboard.apps() == ["model-m.v1", "model-m.v2"]
    again = gw.http.post("/v1/models/m/switch", json={"version": "v3"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "switch_in_progress"
    gw.statuses["v2"] = LOADING
    gw.tick()
    assert gw.spec().weights()["v1"] == 100  # not Ready: traffic stays
    assert {gw.infer().headers["x-dify-model-version"] for _ in range(10)} == {"v1"}
    gw.statuses["v2"] = READY
    gw.tick()
    assert gw.spec().weights() == {"v1": 0, "v2": 100, "v3": 0}
    assert {gw.infer().headers["x-dify-model-version"] for _ in range(10)} == {"v2"}
    status = gw.http.get("/v1/models/status").json()["models"][0]
    assert status["rollout"]["phase"] == "Draining" and status["rollout"]["draining"] == ["v1"]
    gw.statuses["v2"] = LOADING  # v2's replica restarts while v1 drains: v1 answers meanwhile
    gw.publish()
    assert {gw.infer().headers["x-dify-model-version"] for _ in range(10)} == {"v1"}
    gw.statuses["v2"] = READY
    gw.publish()
    gw.state.rollouts.drain_min_s = 0.0
    gw.replicas["v1"].active = 1  # v1 still runs a stream
    gw.tick()
    assert gw.spec().rollout.phase == "Draining"  # type: ignore[union-attr]
    gw.replicas["v1"].active = 0
    gw.tick()
    assert gw.spec().rollout.phase == "Complete"  # type: ignore[union-attr]
    assert gw.dashboard.apps() == ["model-m.v2"]
    # and back
    back = gw.http.post("/v1/models/m/rollback")
    assert back.status_code == 202 and back.json()["rollout"]["target"] == {"v1": 100}
    gw.tick()
    gw.tick()
    assert gw.spec().weights() == {"v1": 100, "v2": 0, "v3": 0}


def test_a_failed_version_is_reported_and_the_next_switch_may_start(gw: Gateway) -> None:
    assert gw.http.post("/v1/models/m/switch", json={"version": "v2"}).status_code == 202
    gw.statuses["v2"] = FAILED
    gw.tick()
    rollout = gw.http.get("/v1/models/status").json()["models"][0]["rollout"]
    assert rollout["phase"] == "Failed" and "OSError: no" in rollout["message"]
    assert gw.infer().headers["x-dify-model-version"] == "v1"
    assert gw.http.post("/v1/models/m/switch", json={"version": "v3"}).status_code == 202


def test_canary_share_over_500_requests_is_within_binomial_bounds(gw: Gateway) -> None:
    r = gw.http.post(
        "/v1/models/m/switch", json={"version": "v2", "strategy": "canary", "weight": 10}
    )
    assert r.status_code == 202, r.text
    gw.tick()
    assert gw.spec().weights() == {"v1": 90, "v2": 10, "v3": 0}
    served = Counter(gw.infer().headers["x-dify-model-version"] for _ in range(500))
    n, p = 500, 0.10
    sd = math.sqrt(n * p * (1 - p))
    assert abs(served["v2"] - n * p) <= 4 * sd, served  # 4 sigma: fails ~1 in 16,000 runs
    assert served["v1"] + served["v2"] == 500


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"version": "nope"}, 404, "version_not_found"),
        ({"version": "v2", "strategy": "canary"}, 422, "invalid_request"),
        ({"version": "v2", "strategy": "canary", "weight": 0}, 422, "invalid_request"),
        ({"version": "v2", "strategy": "sideways"}, 422, "invalid_request"),
    ],
)
def test_bad_switches(gw: Gateway, body: dict[str, Any], status: int, code: str) -> None:
    r = gw.http.post("/v1/models/m/switch", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_switching_what_cannot_switch(gw: Gateway) -> None:
    assert gw.http.post("/v1/models/other/switch", json={"version": "v2"}).status_code == 404
    r = gw.http.post("/v1/models/m/rollback")
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_roll_back"


def test_a_load_cannot_write_a_rollout(gw: Gateway) -> None:
    spec = {"name": "x", "modelId": "m", "versions": [{"name": "a", "modelId": "m", "weight": 100}]}
    r = gw.http.post("/v1/models/load", json={**spec, "rollout": {"target": {"a": 100}}})
    assert r.status_code == 422 and "switch" in r.json()["error"]["message"]


def test_the_operator_writes_each_versions_phase_into_the_status() -> None:
    from dify_operator import reconcile

    model = versioned({"v1": 90, "v2": 10})
    running = {
        "status": "RUNNING",
        "deployments": {"ModelServer": {"replicas": [{"state": "RUNNING"}]}},
    }
    apps = {"model-m.v1": running, "model-m.v2": {"status": "DEPLOYING", "deployments": {}}}
    fields = reconcile.model_status_fields("m", model.spec, apps, "http://gw/v1")
    assert fields["phase"] == "Degraded"
    assert fields["versions"] == [
        {"name": "v1", "weight": 90, "phase": "Ready", "readyReplicas": 1},
        {"name": "v2", "weight": 10, "phase": "Loading", "readyReplicas": 0},
    ]
    applier = reconcile.Applier.__new__(reconcile.Applier)
    applier._apps_cache = (float("inf"), apps)  # type: ignore[attr-defined]
    assert applier.app_exists("m") and not applier.app_exists("n")
