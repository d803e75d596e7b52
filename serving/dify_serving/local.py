"""Run the whole stack on one machine: a local Ray, Serve, the file store.

`LocalStack` is what `dify-mirror serve` and the tests use: start Ray once, then apply
desired states (render + PUT through the dashboard, exactly as a cluster is driven) and
wait for them to settle.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from dify_serving.catalog.files import LocalStateStore
from dify_serving.control import RayDashboard
from dify_serving.manifests import DesiredState, check_collections
from dify_serving.options import ServeOptions
from dify_serving.render import TASKS_APP, render_serve_config, servable_indexes
from dify_serving.security.secrets import SECRET_NAMES
from dify_serving.settings import Settings
from dify_serving.specs import Phase
from dify_serving.status import awaiting_placement, index_status, model_status

#: Largest message between deployments on the local stack (Ray Serve's own default: 4 MiB).
TRANSPORT_BYTES = 64 * 1024 * 1024


class LocalStack:
    def __init__(self, settings: Settings, object_store_memory: int | None = None) -> None:
        self.settings = settings
        self.object_store_memory = object_store_memory
        self.store = LocalStateStore(settings.state_dir)
        self.dashboard: RayDashboard | None = None
        self.options: ServeOptions | None = None

    def start(self) -> str:
        """Start Ray (CPUs pinned) and return the dashboard URL."""
        import ray

        # Serve reads these once, in the controller, proxy and replicas that ray.init
        # starts: they must be in the environment before it.
        os.environ.setdefault("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "2")
        proxy_port = self._fast_path_environment()
        ctx = ray.init(
            address="local",  # always a new local cluster, never one found lying around
            dashboard_port=self.settings.ray_dashboard_port,
            num_cpus=logical_cpus(self.settings),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=self.object_store_memory,
            log_to_driver=False,
            configure_logging=False,
        )
        url = f"http://{ctx.dashboard_url}"
        self.dashboard = RayDashboard(url, token=_token())
        self.options = self.settings.serve_options(proxy_port=proxy_port, dashboard_url=url)
        self._leave_secrets()
        return url

    def _leave_secrets(self) -> None:
        """Secrets given to this process reach its replicas as files under home/secrets.

        Replicas inherit this environment, so a secret from a `DIFY_MIRROR_*` variable
        needs nothing more; one passed to `Settings` directly is written (mode 0600).
        """
        from dify_serving.security.secrets import read_secret, write_secret

        home = self.settings.state_dir
        for name in SECRET_NAMES:
            value = self.settings.secret(name)
            if value is not None and read_secret(name, home) != value:
                write_secret(home, name, value)

    def _fast_path_environment(self) -> int | None:
        """Cut Serve's per-request CPU; returns the proxy's (internal) port, if moved.

        With `direct_ingress` the gateway replicas serve the public port themselves
        (`gateway.app.Gateway`), so a request costs one process hop instead of
        proxy → gateway; gRPC between deployments and user code on the replica's own loop
        cut the gateway → model call. Measured in docs/benchmarks.md.
        """
        os.environ.update(
            {
                "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
                "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
            }
        )
        # gRPC's 4 MiB default would refuse a body the gateway accepts (16 MiB): room for
        # the largest body with its pickling; the gateway's call budgets read this value.
        os.environ.setdefault("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(TRANSPORT_BYTES))
        return _free_port() if self.settings.direct_ingress else None

    def apply(self, state: DesiredState) -> dict[str, Any]:
        """Make Serve match `state`; returns the config that was applied."""
        assert self.dashboard is not None and self.options is not None, "start() first"
        check_collections(state, self.options.qdrant_url, "desired state")
        self.store.save(state, self.options)
        config = render_serve_config(state, self.options)
        self.dashboard.put_applications(config)
        return config

    def statuses(self) -> dict[str, dict[str, Any]]:
        assert self.dashboard is not None
        apps = self.dashboard.get_applications().get("applications") or {}
        assert self.options is not None
        state, _ = self.store.load()
        free, now = None, time.time()
        if any(awaiting_placement(app) for app in apps.values()):  # can Ray place them?
            import ray

            free = ray.available_resources() if ray.is_initialized() else None
        out = {n: model_status(n, m.spec, apps, None, free, now) for n, m in state.models.items()}
        if "data" in self.options.gateway.modules:  # indexes waiting for a model: Pending
            for index, _ in servable_indexes(state):
                status = index_status(index.name, index.spec, state.models, apps)
                out[f"index/{index.name}"] = status
        gateway = apps.get("gateway", {})
        out["gateway"] = {"name": "gateway", "phase": _gateway_phase(gateway.get("status"))}
        for name in sorted(apps):  # task consumers: the shared queue's and models' own
            if name == TASKS_APP or name.startswith(f"{TASKS_APP}-"):
                out[name] = {"name": name, "phase": _gateway_phase(apps[name].get("status"))}
        return out

    def wait(self, timeout: float = 300, poll: float = 0.5) -> dict[str, dict[str, Any]]:
        """Until every model is Ready or Failed (or cannot be scheduled: it says why) and
        the gateway runs (or timeout)."""
        deadline = time.monotonic() + timeout
        settled = {Phase.READY.value, Phase.FAILED.value, Phase.DEGRADED.value}
        while True:
            statuses = self.statuses()
            if all(s["phase"] in settled or s.get("reason") for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack not settled after {timeout}s: {statuses}")
            time.sleep(poll)

    def stop(self) -> None:
        import ray
        from ray import serve

        if self.dashboard is not None:
            self.dashboard.close()
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def logical_cpus(settings: Settings, cores: int | None = None) -> int:
    """The CPUs Ray may hand out on one machine: the cores times `cpu_overcommit`.

    Like Ollama, several small models share a box: Ray's CPUs are a reservation, not a
    limit, and each replica still runs `resources.cpus` math threads (render `_env`),
    so overcommitting them lets a third model load on two cores instead of waiting
    forever. `ray_num_cpus` sets the count outright.
    """
    if settings.ray_num_cpus:
        return settings.ray_num_cpus
    return max(1, int((cores or os.cpu_count() or 1) * settings.cpu_overcommit))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gateway_phase(status: str | None) -> str:
    return (
        Phase.READY.value
        if status == "RUNNING"
        else (Phase.FAILED.value if status == "DEPLOY_FAILED" else Phase.LOADING.value)
    )


def _token() -> str | None:
    from dify_serving.control import ray_auth_token

    token = ray_auth_token()
    if token:
        return token
    try:
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

        header = AuthenticationTokenLoader.instance().get_token_for_http_header()
        value = next(iter(header.values()), "")
        return value.removeprefix("Bearer ").strip() or None
    except Exception:
        return None


def ensure_home(settings: Settings) -> Path:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return settings.state_dir
