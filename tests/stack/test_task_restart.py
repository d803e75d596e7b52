"""Tasks in flight survive the stack: `dify-mirror serve` with the embedded broker, its
consumer replica SIGKILLed mid-task, then the whole stack stopped with SIGINT and
started again on the same state folder. Every task ends COMPLETED (or FAILED with a
reason), none stays PENDING or RUNNING, and each one's webhook fires exactly once.

Then, on the restarted stack: cancelling a running generation stops it (its output stops
growing) and frees its batch slot.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from support import AUTH, free_port, model_doc, wait_for
from webhooks import Hooks

from dify_serving.tasks.webhook import webhook_secret

# Minutes of its own Ray stacks: `make test-slow`, not `make test`.
pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "dify_serving.cli"]
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


class Serve:
    """`dify-mirror serve` as a user runs it; start again on the same home."""

    def __init__(self, tmp_path: Path) -> None:
        self.manifest = tmp_path / "llm.yaml"
        self.manifest.write_text(
            yaml.safe_dump(
                model_doc(
                    "demo-llm",
                    "builtin:demo-llm",
                    "text-generation",
                    generation={"maxNewTokens": 1536, "maxContextTokens": 2048},
                )
            )
        )
        self.home = tmp_path / "home"
        self.port = free_port()
        self.env = {
            **os.environ,
            "DIFY_MIRROR_HOME": str(self.home),
            "DIFY_MIRROR_RAY_DASHBOARD_PORT": str(free_port()),
            "DIFY_MIRROR_RAY_NUM_CPUS": "1",
            "DIFY_MIRROR_TASK_LEASE_S": "3",
            "DIFY_MIRROR_TASK_CONCURRENCY": "3",
            "DIFY_MIRROR_WEBHOOK_ALLOW_PRIVATE": "true",
        }
        self.proc: subprocess.Popen[str] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> None:
        """Start serve and wait for its model; again (a few times) when Ray's proxy lost
        the race for the free port `serve` picked for it to another process."""
        for attempt in range(attempts):
            output = self._start()
            if output is None:
                return
            assert "Failed to bind" in output and attempt < attempts - 1, output

    def _start(self) -> str | None:
        """None once the model is Ready; the output of a serve that exited."""
        self.proc = subprocess.Popen(
            [*CLI, "serve", "-f", str(self.manifest), "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                return self.proc.stdout.read() if self.proc.stdout else ""
            try:
                r = httpx.get(f"{self.url}/v1/models/status", headers=AUTH)
                if r.status_code == 200 and [m["phase"] for m in r.json()["models"]] == ["Ready"]:
                    return None
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve never answered"
            time.sleep(1)

    def interrupt(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(120) == 0

    def kill_consumer(self) -> int:
        """SIGKILL this stack's task consumer replica (found by its state folder)."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if b"ServeReplica:tasks:TaskWorker" in cmdline and (
                f"DIFY_MIRROR_HOME={self.home}".encode() in environ
            ):
                os.kill(int(pid), signal.SIGKILL)
                return int(pid)
        raise AssertionError("no task consumer replica found")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    stack = Serve(tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def statuses(client: httpx.Client, ids: list[str]) -> dict[str, str]:
    return {t: client.get(f"/v1/tasks/{t}").json()["status"] for t in ids}


def test_tasks_survive_a_killed_consumer_and_a_restart(serve: Serve) -> None:
    serve.start()
    hooks = Hooks(webhook_secret(serve.home))
    client = httpx.Client(base_url=serve.url, headers=AUTH, timeout=60)
    ids = [
        client.post(
            "/v1/inference/async",
            json={
                "prompt": f"story {i}",
                "max_tokens": 768,
                "temperature": 0,
                "stream": i % 2 == 0,
                "callback_url": hooks.url,
            },
        ).json()["task_id"]
        for i in range(9)
    ]
    assert wait_for(lambda: "RUNNING" in statuses(client, ids).values(), 120)
    serve.kill_consumer()
    # with the consumer dead, stop the stack too: SIGINT, as a user's Ctrl-C
    serve.interrupt()
    client.close()
    serve.start()
    client = httpx.Client(base_url=serve.url, headers=AUTH, timeout=60)
    assert wait_for(lambda: all(s in FINISHED for s in statuses(client, ids).values()), 600), (
        statuses(client, ids)
    )
    tasks = [client.get(f"/v1/tasks/{t}").json() for t in ids]
    for task in tasks:
        assert task["status"] == "COMPLETED" or (
            task["status"] == "FAILED" and task["error"]["code"] == "interrupted"
        ), task
    assert any(task["attempts"] > 1 for task in tasks), "no task was interrupted"
    assert wait_for(lambda: len(hooks.received) >= len(ids), 60)
    time.sleep(2)  # a second answer for any task would arrive now
    assert Counter(body["task_id"] for body in hooks.received) == Counter(ids)
    assert hooks.forged == 0

    # a running generation, cancelled, stops and frees its slot
    long = client.post(
        "/v1/inference/async",
        json={"prompt": "on and on", "max_tokens": 1536, "temperature": 0, "stream": True},
    ).json()["task_id"]
    assert wait_for(lambda: len(client.get(f"/v1/tasks/{long}").json().get("output") or "") > 0, 60)
    r = client.delete(f"/v1/tasks/{long}")
    assert r.status_code == 200 and r.json()["status"] == "CANCELLED"
    time.sleep(1.5)
    before = client.get(f"/v1/tasks/{long}").json()
    time.sleep(1.5)
    after = client.get(f"/v1/tasks/{long}").json()
    assert after["status"] == "CANCELLED" and after.get("output") == before.get("output")
    assert len(after["output"]) > 0 and after["finished_at"] is not None
    # its sequence left the engine: nothing runs there any more
    info = client.get("/v1/models/status").json()["models"][0]
    assert info["phase"] == "Ready" and info["active_requests"] == 0, info
    serve.interrupt()
