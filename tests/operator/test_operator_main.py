"""`python -m dify_operator` starts, logs in from a kubeconfig, and answers its probe."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from kube_emulator import start_emulator
from support import free_port


@pytest.mark.asyncio
async def test_module_entry_point_serves_liveness(tmp_path: Path) -> None:
    async with start_emulator() as emu:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emu",
                    "clusters": [{"name": "emu", "cluster": {"server": str(emu.url).rstrip("/")}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [
                        {
                            "name": "emu",
                            "context": {"cluster": "emu", "user": "u", "namespace": "default"},
                        }
                    ],
                }
            )
        )
        port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "DIFY_MIRROR_PEERING": "",
            "DIFY_MIRROR_LIVENESS_PORT": str(port),
            "DIFY_MIRROR_RAY_DASHBOARD": f"http://127.0.0.1:{free_port()}",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "dify_operator"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            body = None
            async with httpx.AsyncClient() as http:
                for _ in range(120):
                    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                    try:
                        r = await http.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                        if r.status_code == 200:
                            body = r.json()
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.5)
            assert body is not None and "applied_configs" in body
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)


def test_a_bad_setting_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """Serve options are built once, at start: two gateway replicas without Redis end the
    operator at once, instead of failing inside every reconcile (kopf retries forever)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DIFY_MIRROR_") and key != "KUBECONFIG"
    }
    env |= {
        "KUBECONFIG": str(tmp_path / "no-kubeconfig"),  # never reached
        "DIFY_MIRROR_PEERING": "",
        "DIFY_MIRROR_LIVENESS_PORT": str(free_port()),
        "DIFY_MIRROR_GATEWAY_REPLICAS": "2",
    }
    done = subprocess.run(
        [sys.executable, "-m", "dify_operator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert "DIFY_MIRROR_REDIS_URL" in lines[0] and "Traceback" not in done.stderr
