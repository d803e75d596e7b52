"""Many models on one small machine, tried as a new user would.

A third model next to the quickstart on two cores: without overcommit Ray has no CPU
left, and the model must read Pending / Unschedulable (what it needs, what is free)
instead of Loading forever. With the default overcommit it loads, its math threads still
pinned to its own `resources.cpus`. A model with `minReplicas: 0` and a short idle
timeout scales to zero, reads Ready with no replicas, wakes on the next request and
reports that cold start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import API_KEY, AUTH, free_port, model_doc

from dify_serving.local import LocalStack
from dify_serving.manifests import load_file, merge_states, parse_documents
from dify_serving.settings import Settings
from dify_serving.status import PLACEMENT_GRACE_S

# Minutes of its own Ray stacks: `make test-slow`, not `make test`.
pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"


@contextmanager
def quickstart_stack(home: Path, tiny_dir: Path, **settings: Any) -> Iterator[httpx.Client]:
    """The quickstart on a local stack of its own; a client of its gateway."""
    local = LocalStack(
        Settings(
            home=home,
            port=free_port(),
            ray_dashboard_port=free_port(),
            model_roots=[str(tiny_dir)],
            **settings,
        ),
        object_store_memory=150 * 1024 * 1024,
    )
    local.start()
    try:
        local.apply(load_file(QUICKSTART))
        local.wait(timeout=600)
        url = f"http://127.0.0.1:{local.settings.port}"
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
            client.stack = local  # type: ignore[attr-defined]
            yield client
    finally:
        local.stop()


def status_of(client: httpx.Client, name: str) -> dict[str, Any]:
    r = client.get("/v1/models/status")
    assert r.status_code == 200, r.text
    return next((m for m in r.json()["models"] if m["name"] == name), {})


def wait_status(
    client: httpx.Client, name: str, done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = status_of(client, name)
        if status and done(status):
            return status
        assert time.monotonic() < deadline, f"{name} never got there: {status}"
        time.sleep(0.5)


def cli(client: httpx.Client, *args: str) -> subprocess.CompletedProcess[str]:
    """`dify-mirror ARGS` against the client's stack, as its user runs it."""
    stack: LocalStack = client.stack  # type: ignore[attr-defined]
    env = {
        **os.environ,
        "DIFY_MIRROR_HOME": str(stack.settings.state_dir),
        "DIFY_MIRROR_API_KEY": API_KEY,
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "dify_serving.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def third_model(tiny_dir: Path) -> dict[str, Any]:
    """What a new user loads next: a small classifier with the quickstart's 1 CPU."""
    return {
        "name": "third",
        "modelId": str(tiny_dir / "clf"),
        "task": "text-classification",
        "resources": {"cpus": 1},
    }


#: Set in the child pytest that runs a test of this file in a process of its own.
CHILD = "DIFY_MIRROR_TEST_OWN_PROCESS"


@pytest.fixture(autouse=True)
def own_process(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Each test here starts a Ray of its own, which cannot share a process with the
    session stack's: unless already in one, the test runs in a child pytest and this
    process only checks that it passed."""
    if os.environ.get(CHILD):
        yield True
        return
    root = Path(__file__).parents[2]
    node = request.node.nodeid.split("::", 1)[1]
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            f"{__file__}::{node}",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
        ],
        cwd=root,
        env={**os.environ, CHILD: "1"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(child.stdout[-3000:])
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    yield False


def test_a_third_model_on_two_cpus_reads_unschedulable(
    tmp_path: Path, tiny_dir: Path, own_process: bool
) -> None:
    if not own_process:
        return  # it ran, and passed, in its own process
    with quickstart_stack(tmp_path / "home", tiny_dir, ray_num_cpus=2) as client:
        asked = time.monotonic()
        r = client.post("/v1/models/load", json=third_model(tiny_dir))
        assert r.status_code == 202, r.text
        status = wait_status(client, "third", lambda s: s["phase"] != "Loading", timeout=60)
        seen_after = time.monotonic() - asked
        assert status["phase"] == "Pending", status
        assert status["reason"] == "Unschedulable"
        assert status["needs"] == {"CPU": 1.0} and status["free"] == {"CPU": 0.0}
        assert "needs 1 CPU" in status["message"] and "0 CPU free" in status["message"]
        # seen in seconds, not after Serve's own 30 s warning
        assert seen_after < PLACEMENT_GRACE_S + 15, seen_after
        ready = client.get("/v1/models/third/ready")
        assert ready.status_code == 503 and ready.json()["phase"] == "Pending"
        r = client.post("/v1/inference", json={"model": "third", "input": "fine"})
        assert r.status_code == 503 and "unschedulable" in r.json()["error"]["message"]
        # the quickstart models are untouched
        assert status_of(client, "minilm")["phase"] == "Ready"
        # the CLI says so too, and `--wait` gives up with 124 naming it
        out = cli(client, "status", "--wait", "--timeout", "2", "--interval", "0.5")
        assert out.returncode == 124, out
        assert "Pending (Unschedulable)" in out.stdout and "needs 1 CPU" in out.stdout
        assert "timed out waiting for third" in out.stdout
        print(f"\nthird model read Unschedulable {seen_after:.1f} s after the load call")


def test_overcommit_loads_it_and_a_sleeping_model_wakes(
    tmp_path: Path, tiny_dir: Path, own_process: bool
) -> None:
    if not own_process:
        return  # it ran, and passed, in its own process
    with quickstart_stack(tmp_path / "home", tiny_dir) as client:  # default overcommit
        import ray

        assert ray.cluster_resources()["CPU"] >= 3  # logical CPUs beyond the two cores
        stack: LocalStack = client.stack  # type: ignore[attr-defined]
        stored, _ = stack.store.load()
        sleepy = model_doc(
            "sleepy",
            str(tiny_dir / "clf"),
            "text-classification",
            resources={"cpus": 1},
            autoscaling={"minReplicas": 0, "maxReplicas": 1, "idleTimeoutS": 2},
        )
        third = third_model(tiny_dir)
        name = third.pop("name")
        extra = parse_documents(
            [model_doc(name, third.pop("modelId"), third.pop("task"), **third), sleepy]
        )
        stack.apply(merge_states(stored, extra)[0])
        statuses = stack.wait(timeout=300)
        assert statuses["third"]["phase"] == "Ready", statuses["third"]
        wait_status(client, "third", lambda s: s["phase"] == "Ready", timeout=30)  # gateway too
        r = client.post("/v1/inference", json={"model": "third", "input": "fine"})
        assert r.status_code == 200, r.text
        # math threads stay pinned to the replica's own CPUs, whatever Ray hands out
        assert stack.dashboard is not None
        apps = stack.dashboard.get_applications()["applications"]
        for app, cpus in (("model-third", "1"), ("model-minilm", "1"), ("model-sleepy", "1")):
            config = apps[app]["deployments"]["ModelServer"]["deployment_config"]
            env = config["ray_actor_options"]["runtime_env"]["env_vars"]
            assert env["OMP_NUM_THREADS"] == cpus and env["MKL_NUM_THREADS"] == cpus
            assert config["ray_actor_options"]["num_cpus"] == float(cpus)

        # scale to zero: Ready, no replicas; the first request wakes it
        asleep = wait_status(client, "sleepy", lambda s: s.get("scaled_to_zero"), timeout=180)
        assert asleep["phase"] == "Ready" and asleep["ready_replicas"] == 0
        assert client.get("/v1/models/sleepy/ready").status_code == 200
        started = time.monotonic()
        r = client.post("/v1/inference", json={"model": "sleepy", "input": "wake up"})
        took = time.monotonic() - started
        assert r.status_code == 200, r.text
        awake = wait_status(client, "sleepy", lambda s: s["ready_replicas"] == 1, timeout=30)
        assert awake["phase"] == "Ready" and not awake["scaled_to_zero"]
        assert 0 < awake["last_cold_start_s"] <= took + 0.5, (awake, took)
        print(f"\ncold start of a sleeping classifier: {awake['last_cold_start_s']:.2f} s")
        out = cli(client, "status", "--wait", "--timeout", "60")
        assert out.returncode == 0, out
        assert "last cold start" in out.stdout
