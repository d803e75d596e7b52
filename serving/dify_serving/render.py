"""Render the desired state into one Ray Serve multi-application config.

Pure and level-based: all specs in, the whole config out, sorted, so rendering the same
state twice gives byte-identical JSON and re-applying it changes nothing in Ray. Nothing
here imports ray or torch; the operator calls it too.
"""

from __future__ import annotations

from typing import Any

from dify_serving.manifests import DesiredState
from dify_serving.options import CacheOptions, GatewayOptions, ModelSourceOptions, ServeOptions
from dify_serving.rollout import loaded_versions
from dify_serving.specs import Autoscaling, DifyIndex, DifyModel, Task

GATEWAY_APP = "gateway"
MODEL_APP_PREFIX = "model-"
INDEX_APP_PREFIX = "index-"
TASKS_APP = "tasks"
#: The queue of tasks whose model has no consumers of its own (`tasks/queue.py`).
SHARED_QUEUE = "dify-tasks"
#: Modules whose work runs as tasks: with any of them on, the consumers run too.
TASK_MODULES = ("inference", "data")
#: Seconds a consumer replica waits for its running tasks when it is stopped; a task
#: still running then is run again by another consumer once its lease runs out.
TASKS_SHUTDOWN_S = 10.0
#: Seconds a replica waits for in-flight requests when its model is unloaded.
GRACEFUL_SHUTDOWN_S = 3.0
#: Requests one index replica runs at once (`max_ongoing_requests`).
INDEX_MAX_ONGOING = 256
#: Ray's own resource of the head node. In a cluster the gateway replicas ask for a sliver
#: of it: the chart's Service sends the gateway's own ports (HTTP, gRPC) to the head pod,
#: and a replica with `num_cpus: 0` would otherwise land on any worker, out of its reach.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def model_app_name(name: str, version: str | None = None) -> str:
    """`model-<name>`, or `model-<name>.<version>` for one version of a versioned model
    ('.' is in no resource name, so no two models' apps can share a name)."""
    return f"{MODEL_APP_PREFIX}{name}" if version is None else f"{MODEL_APP_PREFIX}{name}.{version}"


def model_app_names(model: DifyModel) -> list[str]:
    """The Serve apps a model runs now: one, or one per loaded version."""
    if not model.spec.versions:
        return [model_app_name(model.name)]
    return [model_app_name(model.name, v) for v in loaded_versions(model.spec)]


def index_app_name(name: str) -> str:
    return f"{INDEX_APP_PREFIX}{name}"


def _threads(cpus: float) -> int:
    return max(1, round(cpus))


def _env(threads: int, sources: ModelSourceOptions) -> dict[str, str]:
    """A replica's environment: pinned math threads; the hub offline unless allowed."""
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    # Set by the app itself either way: a replica must not inherit the Makefile's choice.
    offline = "0" if sources.hub_downloads else "1"
    return env | {"HF_HUB_OFFLINE": offline, "TRANSFORMERS_OFFLINE": offline}


def model_apps(model: DifyModel, home: str, sources: ModelSourceOptions) -> list[dict[str, Any]]:
    """One model → one Serve application, or one per loaded version (`rollout.py`)."""
    if not model.spec.versions:
        return [model_app(model, home, sources)]
    return [model_app(model, home, sources, version) for version in loaded_versions(model.spec)]


def autoscaling_config(scaling: Autoscaling) -> dict[str, Any]:
    """A model's `autoscaling` → Serve's `autoscaling_config`.

    `idleTimeoutS` is how long Serve waits before it removes a replica, the last one too
    (`downscale_delay_s`, `downscale_to_zero_delay_s`). A model that may scale to zero
    still starts one replica (`initial_replicas`): a model that cannot load fails when it
    is applied, not at its first request; it sleeps once idle for `idleTimeoutS`.
    """
    config: dict[str, Any] = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests,
    }
    if scaling.idle_timeout_s is not None:
        config["downscale_delay_s"] = scaling.idle_timeout_s
        config["downscale_to_zero_delay_s"] = scaling.idle_timeout_s
    if scaling.min_replicas == 0:
        config["initial_replicas"] = 1
    return config


def model_app(
    model: DifyModel, home: str, sources: ModelSourceOptions, version: str | None = None
) -> dict[str, Any]:
    """One model (or one version of it) → one Serve application (no HTTP route; reached
    through the gateway)."""
    spec = model.spec if version is None else model.spec.for_version(version)
    gpus = max(spec.resources.gpus, 1.0) if spec.uses_cuda else spec.resources.gpus
    actor: dict[str, Any] = {
        "num_cpus": spec.resources.cpus,
        "num_gpus": gpus,
        "runtime_env": {"env_vars": _env(_threads(spec.resources.cpus), sources)},
    }
    deployment: dict[str, Any] = {
        "name": "ModelServer",
        "max_ongoing_requests": spec.batching.max_concurrent_requests,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5,
        "ray_actor_options": actor,
    }
    if spec.autoscaling:
        deployment["autoscaling_config"] = autoscaling_config(spec.autoscaling)
    else:
        deployment["num_replicas"] = spec.replicas
    return {
        "name": model_app_name(model.name, version),
        "route_prefix": None,  # omitted would mean "/": model apps have no HTTP route
        "import_path": "dify_serving.deployments:build_model_app",
        "args": {
            "name": model.name,
            "spec": spec.wire(),
            "home": home,
            "sources": sources.model_dump(mode="json"),
            **({"version": version} if version is not None else {}),
        },
        "deployments": [deployment],
    }


def index_app(
    index: DifyIndex,
    model: DifyModel,
    home: str,
    qdrant_url: str | None,
    sources: ModelSourceOptions,
    cache: CacheOptions | None = None,
) -> dict[str, Any]:
    """One index → one Serve application: the single writer of its collection.

    One replica: an embedded shard is a directory one process owns. It needs little CPU
    (tokenizing, the store); the embedding model app does the heavy work.
    """
    return {
        "name": index_app_name(index.name),
        "route_prefix": None,
        "import_path": "dify_serving.knowledge.deployment:build_index_app",
        "args": {
            "name": index.name,
            "spec": index.spec.wire(),
            "model": {"name": model.name, "spec": model.spec.wire()},
            "home": home,
            "qdrant_url": qdrant_url,
            "sources": sources.model_dump(mode="json"),
            # the index replica caches its own searches (single writer: exact invalidation)
            "cache": (cache or CacheOptions()).model_dump(mode="json", exclude={"redis"}),
        },
        "deployments": [
            {
                "name": "IndexServer",
                "num_replicas": 1,
                "max_ongoing_requests": INDEX_MAX_ONGOING,
                "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
                "graceful_shutdown_wait_loop_s": 0.5,
                "health_check_period_s": 5,
                "ray_actor_options": {
                    "num_cpus": 0,
                    "runtime_env": {"env_vars": _env(1, sources)},
                },
            }
        ],
    }


def servable_indexes(state: DesiredState) -> list[tuple[DifyIndex, DifyModel]]:
    """Indexes whose embedding model exists and embeds; the others wait (Pending)."""
    out = []
    for name in sorted(state.indexes):
        index = state.indexes[name]
        model = state.models.get(index.spec.embedding_model)
        if model is not None and embeds_for_indexes(model):
            out.append((index, model))
    return out


def embeds_for_indexes(model: DifyModel) -> bool:
    """Whether an index can embed with `model`: feature-extraction, and one version only
    (a switch would change the vectors of what is stored already)."""
    return model.spec.task == Task.FEATURE_EXTRACTION and not model.spec.versions


def gateway_app(options: GatewayOptions) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": 0}
    if options.control == "kubernetes":
        actor["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return {
        "name": GATEWAY_APP,
        "route_prefix": "/",
        "import_path": "dify_serving.gateway.app:build_gateway_app",
        "args": options.model_dump(mode="json"),
        "deployments": [
            {
                "name": "Gateway",
                "num_replicas": options.replicas,
                "max_ongoing_requests": 1000,
                "ray_actor_options": actor,
            }
        ],
    }


def task_app_name(model: str | None) -> str:
    return TASKS_APP if model is None else f"{TASKS_APP}-{model}"


def model_queue(name: str) -> str:
    """The queue of a model whose spec asks for consumers of its own."""
    return f"dify-model-{name}"


def task_app(options: GatewayOptions, model: DifyModel | None = None) -> dict[str, Any]:
    """The consumers of one queue: the shared one, or a model's own (`asyncInference`).

    A model's consumers scale on its queue's depth with Ray Serve's
    `AsyncInferenceAutoscalingPolicy` (wrapped so the broker URL, a secret, is read where
    the policy runs); the embedded broker (one machine) has no depth to read, so its
    consumers are a fixed count.
    """
    tasks = options.tasks
    queue = SHARED_QUEUE if model is None else model_queue(model.name)
    deployment: dict[str, Any] = {
        "name": "TaskWorker",
        "max_ongoing_requests": tasks.concurrency,  # Celery threads of each consumer
        "graceful_shutdown_timeout_s": TASKS_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 10,
        "ray_actor_options": {"num_cpus": 0},
    }
    scaling = model.spec.async_inference if model is not None else None
    if scaling is None:
        deployment["num_replicas"] = tasks.consumers
    elif tasks.broker == "embedded":
        deployment["num_replicas"] = max(1, scaling.min_replicas)
    else:
        deployment["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_queue_length,
            "policy": {
                "policy_function": "dify_serving.gateway.worker:QueueDepthPolicy",
                "policy_kwargs": {"home": options.home, "queue_name": queue},
            },
        }
    return {
        "name": task_app_name(model.name if model is not None else None),
        "route_prefix": None,
        "import_path": "dify_serving.gateway.worker:build_task_app",
        "args": {"gateway": options.model_dump(mode="json"), "queue": queue},
        "deployments": [deployment],
    }


def task_apps(state: DesiredState, options: GatewayOptions) -> list[dict[str, Any]]:
    if not any(module in options.modules for module in TASK_MODULES):
        return []
    own = [state.models[n] for n in sorted(state.models) if state.models[n].spec.async_inference]
    return [task_app(options), *(task_app(options, model) for model in own)]


def render_serve_config(state: DesiredState, options: ServeOptions) -> dict[str, Any]:
    """The whole Serve config for a desired state. Same input, same output."""
    gateway = options.gateway
    apps = [gateway_app(gateway), *task_apps(state, gateway)]
    for name in sorted(state.models):
        apps += model_apps(state.models[name], gateway.home, gateway.sources)
    if "data" in gateway.modules:  # a switched-off module starts no backends
        apps += [
            index_app(
                index, model, gateway.home, options.qdrant_url, gateway.sources, gateway.cache
            )
            for index, model in servable_indexes(state)
        ]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": options.host, "port": options.proxy_port or options.port},
        "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
        "applications": apps,
    }
