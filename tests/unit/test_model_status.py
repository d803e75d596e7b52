"""Model status from Serve's application JSON: unschedulable replicas, scale to zero,
the local stack's CPU overcommit and the autoscaling config Serve is given."""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve.config import AutoscalingConfig

from dify_serving.local import logical_cpus
from dify_serving.options import ModelSourceOptions
from dify_serving.render import autoscaling_config, model_app
from dify_serving.settings import Settings
from dify_serving.specs import DifyModel, DifyModelSpec, ObjectMeta
from dify_serving.status import PLACEMENT_GRACE_S, model_status

NOW = 1_800_000_000.0

#: Serve's message once a replica has waited 30 s for resources (Ray 2.60, verbatim).
SLOW = (
    "Deployment 'ModelServer' in application 'model-m' has 1 replicas that have taken more "
    "than 30s to be scheduled. This may be due to waiting for the cluster to auto-scale or "
    "for a runtime environment to be installed. Resources required for each replica: "
    '{"CPU": 2}, total resources available: {"CPU": 0.5}. Use `ray status` for more details.'
)


def spec(**fields: Any) -> DifyModelSpec:
    return DifyModelSpec.model_validate({"modelId": "x", **fields})


def app(
    replicas: list[dict[str, Any]],
    status: str = "DEPLOYING",
    deployment: str = "UPDATING",
    target: int = 1,
    message: str = "",
    required: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "model-m": {
            "status": status,
            "message": "",
            "deployments": {
                "ModelServer": {
                    "status": deployment,
                    "message": message,
                    "target_num_replicas": target,
                    "required_resources": required if required is not None else {"CPU": 2.0},
                    "replicas": replicas,
                }
            },
        }
    }


def unplaced(age_s: float) -> dict[str, Any]:
    """A replica Ray has not given a process yet (Serve: STARTING, pid null)."""
    return {"state": "STARTING", "pid": None, "node_id": None, "start_time_s": NOW - age_s}


def test_a_replica_that_cannot_be_placed_is_pending_unschedulable() -> None:
    apps = app([unplaced(PLACEMENT_GRACE_S + 1)])
    s = model_status("m", spec(resources={"cpus": 2}), apps, free={"CPU": 0.5}, now=NOW)
    assert s["phase"] == "Pending" and s["reason"] == "Unschedulable"
    assert s["needs"] == {"CPU": 2.0} and s["free"] == {"CPU": 0.5}
    assert "needs 2 CPU" in s["message"] and "0.5 CPU free" in s["message"]
    assert "DIFY_MIRROR_CPU_OVERCOMMIT" in s["message"]


def test_a_gpu_replica_names_the_gpu_it_waits_for() -> None:
    apps = app([unplaced(60)], required={"CPU": 1.0, "GPU": 1.0})
    s = model_status("m", spec(), apps, free={"CPU": 3.0, "GPU": 0.0}, now=NOW)
    assert s["reason"] == "Unschedulable"
    assert s["needs"] == {"CPU": 1.0, "GPU": 1.0} and s["free"] == {"CPU": 3.0, "GPU": 0.0}


@pytest.mark.parametrize(
    ("replica", "free"),
    [
        (unplaced(PLACEMENT_GRACE_S - 2), {"CPU": 0.0}),  # its worker may still be starting
        (unplaced(60), {"CPU": 4.0}),  # it fits: placing, not stuck
        ({**unplaced(60), "pid": 4242, "node_id": "n1"}, {"CPU": 0.0}),  # placed: loading
    ],
)
def test_a_replica_that_is_placed_or_fits_is_loading(
    replica: dict[str, Any], free: dict[str, float]
) -> None:
    s = model_status("m", spec(), app([replica]), free=free, now=NOW)
    assert s["phase"] == "Loading" and s["reason"] is None and "needs" not in s


def test_serves_own_message_says_so_without_free_resources() -> None:
    """The operator and the CLI read no resources: Serve's 30 s message is enough."""
    s = model_status("m", spec(), app([unplaced(31)], message=SLOW))
    assert s["phase"] == "Pending" and s["reason"] == "Unschedulable"
    assert s["needs"] == {"CPU": 2.0} and s["free"] == {"CPU": 0.5}
    # the message outlives the wait: once placed, the replica is loading again
    placed = app([{**unplaced(40), "pid": 7}], message=SLOW)
    assert model_status("m", spec(), placed)["phase"] == "Loading"


def test_an_unschedulable_model_reaches_the_custom_resource() -> None:
    from dify_operator import reconcile

    fields = reconcile.model_status_fields("m", spec(), app([unplaced(31)], message=SLOW), "")
    assert fields["phase"] == "Pending" and fields["reason"] == "Unschedulable"
    assert fields["_ready"]["reason"] == "Unschedulable"
    assert fields["_ready"]["status"] == "False"


def test_scaled_to_zero_is_ready_with_no_replicas() -> None:
    scaling = {"minReplicas": 0, "maxReplicas": 1, "idleTimeoutS": 5}
    zero = app([], status="RUNNING", deployment="HEALTHY", target=0)
    s = model_status("m", spec(autoscaling=scaling), zero, free={"CPU": 0.0}, now=NOW)
    assert s["phase"] == "Ready" and s["scaled_to_zero"] is True
    assert s["ready_replicas"] == 0 and s["desired_replicas"] == 0
    assert "wakes" in s["message"]


def test_waking_from_zero_is_ready_not_degraded() -> None:
    scaling = {"minReplicas": 0, "maxReplicas": 1}
    waking = app([unplaced(1)], status="RUNNING", deployment="UPSCALING", target=1)
    s = model_status("m", spec(autoscaling=scaling), waking, free={"CPU": 8.0}, now=NOW)
    assert s["phase"] == "Ready" and s["scaled_to_zero"] is False
    assert s["message"].startswith("scaling up")
    # … unless Ray has no room for the replica it wakes
    stuck = app([unplaced(30)], status="RUNNING", deployment="UPSCALING", target=1)
    s = model_status("m", spec(autoscaling=scaling), stuck, free={"CPU": 0.0}, now=NOW)
    assert s["phase"] == "Pending" and s["reason"] == "Unschedulable"


def test_a_fixed_replica_count_short_of_its_target_is_still_degraded() -> None:
    running = {"state": "RUNNING", "pid": 1, "start_time_s": NOW - 100}
    short = app([running, unplaced(1)], status="RUNNING", deployment="HEALTHY", target=2)
    s = model_status("m", spec(replicas=2), short, free={"CPU": 0.0}, now=NOW)
    assert s["phase"] == "Degraded" and s["reason"] is None


def test_idle_timeout_maps_to_serves_autoscaling_config() -> None:
    scaling = spec(autoscaling={"minReplicas": 0, "maxReplicas": 2, "idleTimeoutS": 30})
    assert scaling.autoscaling is not None
    config = autoscaling_config(scaling.autoscaling)
    assert config == {
        "min_replicas": 0,
        "max_replicas": 2,
        "target_ongoing_requests": 8.0,
        "downscale_delay_s": 30.0,
        "downscale_to_zero_delay_s": 30.0,
        "initial_replicas": 1,
    }
    checked = AutoscalingConfig(**config)  # Ray Serve's own model accepts every field
    assert checked.downscale_to_zero_delay_s == 30.0 and checked.initial_replicas == 1
    plain = spec(autoscaling={"minReplicas": 1, "maxReplicas": 3}).autoscaling
    assert plain is not None
    assert set(autoscaling_config(plain)) == {
        "min_replicas",
        "max_replicas",
        "target_ongoing_requests",
    }
    with pytest.raises(ValueError, match="idleTimeoutS"):
        spec(autoscaling={"minReplicas": 0, "idleTimeoutS": -1})


def test_the_local_stack_overcommits_cpus_but_pins_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert logical_cpus(Settings(), cores=2) == 8  # default 4× the cores
    monkeypatch.setenv("DIFY_MIRROR_CPU_OVERCOMMIT", "1")
    assert logical_cpus(Settings(), cores=2) == 2
    monkeypatch.setenv("DIFY_MIRROR_CPU_OVERCOMMIT", "2.5")
    assert logical_cpus(Settings(), cores=3) == 7
    assert logical_cpus(Settings(ray_num_cpus=3), cores=2) == 3  # set outright
    monkeypatch.setenv("DIFY_MIRROR_CPU_OVERCOMMIT", "0.5")
    with pytest.raises(ValueError, match="cpu_overcommit"):
        Settings()
    # the replica's math threads follow resources.cpus, never Ray's logical count
    m = DifyModel(metadata=ObjectMeta(name="m"), spec=spec(resources={"cpus": 2}))
    deployment = model_app(m, "/h", ModelSourceOptions())["deployments"][0]
    actor = deployment["ray_actor_options"]
    assert actor["num_cpus"] == 2
    assert actor["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"


def test_requests_that_keep_waiting_get_the_adjust_concurrency_hint() -> None:
    from dify_serving.status import WAITING_HINT_AFTER_S, concurrency_hint

    fixed = spec(replicas=2, batching={"maxBatchSize": 8, "maxConcurrentRequests": 16})
    assert concurrency_hint(fixed, 0, None, NOW) == (None, None)
    assert concurrency_hint(fixed, None, NOW - 60, NOW) == (None, None)  # cleared
    since, hint = concurrency_hint(fixed, 3, None, NOW)
    assert since == NOW and hint is None  # one look is not "stays above zero"
    since, hint = concurrency_hint(fixed, 5, since, NOW + WAITING_HINT_AFTER_S)
    assert since == NOW and hint is not None
    assert "adjust concurrency" in hint and "replicas (now 2)" in hint
    assert "maxBatchSize (now 8)" in hint and "maxConcurrentRequests (now 16)" in hint
    scaled = spec(autoscaling={"minReplicas": 1, "maxReplicas": 3})
    _, hint = concurrency_hint(scaled, 1, NOW - 30, NOW)
    assert hint is not None and "autoscaling.maxReplicas (now 3)" in hint


def test_the_gateway_times_a_wake_and_never_wakes_a_model_to_show_it() -> None:
    import asyncio

    from dify_serving.gateway.replicas import ModelClient
    from dify_serving.gateway.status_cache import StatusCache
    from dify_serving.options import GatewayOptions

    class Catalog:
        idle_refresh_s = 5.0

        def models(self) -> dict[str, Any]:
            return {}

    calls: list[str] = []

    class Handle:
        def __getattr__(self, method: str) -> Any:
            class Remote:
                def remote(self, *args: Any) -> Any:
                    calls.append(method)
                    return asyncio.sleep(0.05, result="ok")

            return Remote()

    async def scenario() -> None:
        status = StatusCache(Catalog(), None)  # type: ignore[arg-type]
        status.models["m"] = {"phase": "Ready", "ready_replicas": 0, "scaled_to_zero": True}
        client = ModelClient(Catalog(), status, GatewayOptions())  # type: ignore[arg-type]
        client._handles["model-m"] = Handle()
        assert await client.info("m") == {} and calls == []  # asleep: not woken to be shown
        assert await client.call("m", "predict", "x") == "ok"  # Serve queues it: no 503
        assert calls == ["predict"]
        cold = status.models["m"]["last_cold_start_s"]
        assert 0.05 <= cold < 5 and status.cold_starts == {"m": cold}
        assert status.models["m"]["scaled_to_zero"] is False  # awake until Serve says not
        assert await client.call("m", "predict", "y") == "ok"
        assert status.cold_starts == {"m": cold}  # a warm call is not a cold start
        assert await client.info("m") == "ok" and calls == ["predict", "predict", "info"]

    asyncio.run(scenario())


def test_an_older_status_read_never_replaces_a_newer_one() -> None:
    """Two refreshes overlap (the background loop and a status request); the first one's
    read of Serve is slow. Its older view must not land after the newer one: a version
    that had just taken traffic was seen as starting again, and answered 503 (CI)."""
    import asyncio

    from dify_serving.gateway.status_cache import StatusCache

    model = DifyModel(metadata=ObjectMeta(name="m"), spec=spec())
    app = "model-m"

    def serve(status: str, replica: str) -> dict[str, Any]:
        replicas = [{"state": replica, "pid": 1}]
        deployment = {"status": "HEALTHY", "replicas": replicas, "target_num_replicas": 1}
        return {"applications": {app: {"status": status, "deployments": {"d": deployment}}}}

    class Catalog:
        idle_refresh_s = 5.0

        async def refresh(self) -> None:
            return None

        def models(self) -> dict[str, Any]:
            return {"m": model}

        def indexes(self) -> dict[str, Any]:
            return {}

    class Dashboard:
        def __init__(self) -> None:
            self.reads = 0

        async def get_applications(self) -> dict[str, Any]:
            self.reads += 1
            if self.reads == 1:  # the older read: Serve still starting the replica, slowly
                await asyncio.sleep(0.2)
                return serve("DEPLOYING", "STARTING")
            return serve("RUNNING", "RUNNING")

    async def scenario() -> None:
        status = StatusCache(Catalog(), Dashboard())  # type: ignore[arg-type]
        status.cluster_gpus = 0.0
        first = asyncio.create_task(status.refresh())
        await asyncio.sleep(0.01)  # the first read is under way
        await asyncio.gather(first, status.refresh())
        assert status.models["m"]["phase"] == "Ready", status.models["m"]
        assert status.models["m"]["ready_replicas"] == 1

    asyncio.run(scenario())
