"""Render is pure and level-based: same state, same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import index_doc

from dify_serving.manifests import ManifestError, load_file, parse_documents
from dify_serving.options import GatewayOptions, ModelSourceOptions, ServeOptions
from dify_serving.render import render_serve_config
from dify_serving.status import failure_reason, model_status

ROOT = Path(__file__).resolve().parents[2]


def _model(name: str, **spec: object) -> dict:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": name},
        "spec": {"modelId": "m", **spec},
    }


def test_render_is_deterministic_and_order_free() -> None:
    docs = [_model("b"), _model("a", task="feature-extraction")]
    one = render_serve_config(parse_documents(docs), ServeOptions())
    two = render_serve_config(parse_documents(list(reversed(docs))), ServeOptions())
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert [a["name"] for a in one["applications"]] == ["gateway", "tasks", "model-a", "model-b"]


def test_quickstart_renders_gateway_plus_one_app_per_model() -> None:
    config = render_serve_config(load_file(ROOT / "examples/quickstart.yaml"), ServeOptions())
    apps = {a["name"]: a for a in config["applications"]}
    assert set(apps) == {"gateway", "tasks", "model-demo-llm", "model-minilm", "index-docs"}
    assert apps["gateway"]["route_prefix"] == "/"
    assert apps["model-minilm"]["route_prefix"] is None  # reached through the gateway only
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}


def test_an_index_gets_an_app_only_once_its_embedding_model_exists() -> None:
    docs = [
        _model("emb", task="feature-extraction"),
        _model("llm"),
        index_doc("kb", "emb", store={"collection": "shared"}),
        index_doc("waiting", "missing"),
        index_doc("wrong", "llm"),
    ]
    opts = ServeOptions(qdrant_url="http://qdrant:6333")
    apps = {a["name"]: a for a in render_serve_config(parse_documents(docs), opts)["applications"]}
    assert "index-waiting" not in apps and "index-wrong" not in apps
    kb = apps["index-kb"]
    assert kb["route_prefix"] is None
    assert kb["args"]["model"]["name"] == "emb" and kb["args"]["qdrant_url"] == opts.qdrant_url
    assert kb["args"]["spec"]["store"]["collection"] == "shared"
    assert kb["deployments"][0]["num_replicas"] == 1  # the one writer of its shard
    # the data module switched off: no index backends at all
    off = ServeOptions(gateway=GatewayOptions(modules=["models", "inference"]))
    names = [a["name"] for a in render_serve_config(parse_documents(docs), off)["applications"]]
    assert not [n for n in names if n.startswith("index-")]


def test_model_app_options_follow_the_spec() -> None:
    state = parse_documents(
        [
            _model("gpu", device="cuda:1", precision="bf16", resources={"cpus": 3}),
            _model("auto", autoscaling={"minReplicas": 0, "maxReplicas": 5}),
            _model("fixed", replicas=3),
        ]
    )
    apps = {a["name"]: a for a in render_serve_config(state, ServeOptions())["applications"]}
    gpu = apps["model-gpu"]["deployments"][0]
    assert gpu["ray_actor_options"]["num_gpus"] == 1.0
    assert gpu["ray_actor_options"]["num_cpus"] == 3
    assert gpu["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "3"
    auto = apps["model-auto"]["deployments"][0]
    assert auto["autoscaling_config"]["max_replicas"] == 5 and "num_replicas" not in auto
    assert apps["model-fixed"]["deployments"][0]["num_replicas"] == 3


def test_gateway_options_reach_the_gateway_app() -> None:
    opts = ServeOptions(gateway=GatewayOptions(modules=["inference"], default_model="x"))
    gateway = render_serve_config(parse_documents([]), opts)["applications"][0]
    assert gateway["args"]["modules"] == ["inference"]
    assert gateway["args"]["default_model"] == "x"


def test_in_a_cluster_the_gateway_runs_on_the_head_node() -> None:
    """The chart's Service sends HTTP and gRPC to the Ray head pod, where the gateway
    listens itself; on one machine every node is the head, so nothing is asked for."""
    state = parse_documents([_model("m")])
    for control, resources in (("kubernetes", {"node:__internal_head__": 0.001}), ("local", None)):
        opts = ServeOptions(gateway=GatewayOptions(control=control))
        apps = {a["name"]: a for a in render_serve_config(state, opts)["applications"]}
        actor = apps["gateway"]["deployments"][0]["ray_actor_options"]
        assert actor.get("resources") == resources and actor["num_cpus"] == 0
        # the rest go wherever Ray finds room
        others = [d for name, a in apps.items() if name != "gateway" for d in a["deployments"]]
        assert others and not any("resources" in d["ray_actor_options"] for d in others)


def test_status_mapping() -> None:
    spec = parse_documents([_model("m", replicas=2)]).models["m"].spec
    assert model_status("m", spec, {})["phase"] == "Pending"
    running = {
        "model-m": {
            "status": "RUNNING",
            "deployments": {
                "ModelServer": {
                    "target_num_replicas": 2,
                    "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}],
                }
            },
        }
    }
    status = model_status("m", spec, running)
    assert status["phase"] == "Degraded" and status["ready_replicas"] == 1
    failed = {
        "model-m": {
            "status": "DEPLOY_FAILED",
            "message": "Failed",
            "deployments": {
                "ModelServer": {"message": "Traceback...\n  File x\nValueError: boom\x1b[0m"}
            },
        }
    }
    assert model_status("m", spec, failed)["message"] == "ValueError: boom"
    gpu = parse_documents([_model("g", device="cuda")]).models["g"].spec
    assert model_status("g", gpu, {}, cluster_gpus=0)["phase"] == "Failed"


def test_failure_reason_keeps_the_last_exception() -> None:
    text = (
        "RuntimeError: Traceback (most recent call last):\n  File 'a'\n"
        "dify_serving.engines.weights.WeightsNotFound: no model at /x"
    )
    assert failure_reason(text) == "WeightsNotFound: no model at /x"


def test_direct_serving_moves_serve_proxy_to_its_own_port() -> None:
    opts = ServeOptions(
        port=8000, proxy_port=8123, gateway=GatewayOptions(listen_port=8000, listen_host="0.0.0.0")
    )
    config = render_serve_config(parse_documents([]), opts)
    assert config["http_options"]["port"] == 8123
    assert config["applications"][0]["args"]["listen_port"] == 8000


def test_two_indexes_may_not_share_a_collection() -> None:
    docs = [
        _model("emb", task="feature-extraction"),
        index_doc("notes", "emb", store={"collection": "kb"}),
        index_doc("kb", "emb"),  # its default collection is its name
    ]
    with pytest.raises(ManifestError) as info:
        parse_documents(docs)
    assert "'kb'" in str(info.value) and "'notes'" in str(info.value)
    remote = {"type": "qdrant", "url": "http://qdrant:6333", "collection": "docs"}
    with pytest.raises(ManifestError, match="'a'"):
        parse_documents([index_doc("a", "emb", store=remote), index_doc("b", "emb", store=remote)])
    elsewhere = {**remote, "url": "http://other:6333"}
    state = parse_documents(
        [index_doc("a", "emb", store=remote), index_doc("b", "emb", store=elsewhere)]
    )
    assert sorted(state.indexes) == ["a", "b"]


def test_replicas_stay_off_the_hub_unless_downloads_are_allowed() -> None:
    docs = [_model("emb", task="feature-extraction"), index_doc("kb", "emb")]
    for hub, offline in ((False, "1"), (True, "0")):
        sources = ModelSourceOptions(hub_downloads=hub)
        opts = ServeOptions(gateway=GatewayOptions(sources=sources))
        apps = render_serve_config(parse_documents(docs), opts)["applications"]
        for app in apps:  # every model and index replica
            if not app["name"].startswith(("model-", "index-")):
                continue
            env = app["deployments"][0]["ray_actor_options"]["runtime_env"]["env_vars"]
            assert env.get("HF_HUB_OFFLINE") == offline, app["name"]
            assert app["args"]["sources"]["hub_downloads"] is hub


def test_task_consumers_render_per_queue_without_the_broker_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shared queue's consumers always; a model with `asyncInference` gets its own,
    autoscaled on queue depth by Ray Serve's policy, which reads the URL where it runs."""
    from dify_serving.options import TaskOptions

    monkeypatch.setenv("DIFY_MIRROR_BROKER_URL", "amqp://guest:s3cret@rabbit:5672//")
    scaled = {"minReplicas": 0, "maxReplicas": 5, "targetQueueLength": 8}
    docs = [_model("a"), _model("b", asyncInference=scaled)]
    for broker in ("redis", "embedded"):
        tasks = TaskOptions(broker=broker, consumers=2, concurrency=16)  # type: ignore[arg-type]
        opts = ServeOptions(gateway=GatewayOptions(tasks=tasks))
        config = render_serve_config(parse_documents(docs), opts)
        assert "s3cret" not in json.dumps(config)
        apps = {a["name"]: a for a in config["applications"]}
        assert set(apps) == {"gateway", "tasks", "tasks-b", "model-a", "model-b"}
        shared, own = apps["tasks"], apps["tasks-b"]
        assert shared["args"]["queue"] == "dify-tasks" and own["args"]["queue"] == "dify-model-b"
        assert shared["deployments"][0]["num_replicas"] == 2
        assert shared["deployments"][0]["max_ongoing_requests"] == 16
        assert shared["route_prefix"] is None
        deployment = own["deployments"][0]
        if broker == "embedded":  # no queue depth to read: a fixed count
            assert deployment["num_replicas"] == 1 and "autoscaling_config" not in deployment
            continue
        scaling = deployment["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (0, 5)
        assert scaling["target_ongoing_requests"] == 8
        assert scaling["policy"]["policy_function"].endswith(":QueueDepthPolicy")
        assert scaling["policy"]["policy_kwargs"]["queue_name"] == "dify-model-b"


def test_without_inference_and_data_modules_no_consumers_run() -> None:
    opts = ServeOptions(gateway=GatewayOptions(modules=["models", "openai"]))
    apps = render_serve_config(parse_documents([_model("a")]), opts)["applications"]
    assert [a["name"] for a in apps] == ["gateway", "model-a"]


def test_a_manifests_file_adds_to_the_stored_state_by_name() -> None:
    from dify_serving.manifests import merge_states

    stored = parse_documents(
        [_model("a", task="feature-extraction"), _model("b"), index_doc("kb", "a")]
    )
    incoming = parse_documents([_model("b", modelId="new"), _model("c")])
    merged, kept = merge_states(stored, incoming)
    assert sorted(merged.models) == ["a", "b", "c"] and sorted(merged.indexes) == ["kb"]
    assert merged.models["b"].spec.model_id == "new"  # the file wins by name
    assert kept == ["model a", "index kb"]
    assert merge_states(stored, stored)[1] == []
