"""`dify-mirror serve` and `apply`, run as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from support import AUTH, free_port, model_doc

CLI = [sys.executable, "-m", "dify_serving.cli"]


def test_apply_changes_the_running_stack(
    stack: Any, client: httpx.Client, tiny_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "more.yaml"
    path.write_text(
        yaml.safe_dump(
            model_doc(
                "sentiment-2", str(tiny_dir / "clf"), "text-classification", resources={"cpus": 0.1}
            )
        )
    )
    env = {**os.environ, "DIFY_MIRROR_HOME": str(stack.settings.state_dir)}
    out = subprocess.run(
        [*CLI, "apply", "-f", str(path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 120
    while True:
        r = client.post("/v1/inference", json={"model": "sentiment-2", "input": "fine"})
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)
    assert client.post("/v1/models/unload", json={"name": "sentiment-2"}).status_code == 202


def test_serve_runs_until_interrupted(tmp_path: Path, tiny_dir: Path) -> None:
    """`serve -f FILE` adds the file to the stored state: a model loaded earlier over the
    API (or with `apply`) survives the restart, and `serve` says it kept it."""
    from dify_serving.catalog.files import LocalStateStore
    from dify_serving.manifests import parse_documents
    from dify_serving.options import ServeOptions

    path = tmp_path / "one.yaml"
    path.write_text(
        yaml.safe_dump(model_doc("sentiment", str(tiny_dir / "clf"), "text-classification"))
    )
    earlier = model_doc(
        "extra", str(tiny_dir / "clf"), "text-classification", resources={"cpus": 0.1}
    )
    LocalStateStore(tmp_path / "home").save(parse_documents([earlier]), ServeOptions())
    port = free_port()
    env = {
        **os.environ,
        "DIFY_MIRROR_HOME": str(tmp_path / "home"),
        "DIFY_MIRROR_RAY_DASHBOARD_PORT": str(free_port()),
        "DIFY_MIRROR_RAY_NUM_CPUS": "1",
        "DIFY_MIRROR_MODEL_ROOTS": str(tiny_dir),
    }
    proc = subprocess.Popen(
        [*CLI, "serve", "-f", str(path), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/inference",
                    json={"model": "sentiment", "input": "good"},
                    headers=AUTH,
                    timeout=10,
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve never answered"
            time.sleep(1)
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=AUTH, timeout=10)
        assert {m["id"] for m in listed.json()["data"]} == {"sentiment", "extra"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
        output = proc.stdout.read() if proc.stdout else ""
        assert "serving on" in output and "stopping" in output
        assert "keeping model extra" in output
        with __import__("pytest").raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3)
    finally:
        if proc.poll() is None:
            proc.kill()
