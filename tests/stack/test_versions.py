"""Version switching on the real stack: a blue-green switch and a 10 % canary while 8
streams and 8 plain requests keep going, without one failed request."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from typing import Any

import httpx

NAME = "ver-llm"
VERSIONS = [
    {"name": "v1", "modelId": "builtin:demo-llm", "weight": 100},
    {"name": "v2", "modelId": "builtin:demo-llm", "weight": 0},
]


def wait_rollout(client: httpx.Client, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        models = {m["name"]: m for m in client.get("/v1/models/status").json()["models"]}
        rollout = models[NAME].get("rollout") or {}
        if rollout.get("phase") in ("Complete", "Failed"):
            return models[NAME]
        assert time.monotonic() < deadline, f"the switch never ended: {models[NAME]}"
        time.sleep(0.5)


class Traffic:
    """8 streaming and 8 plain clients, each sending one request after another."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self.base_url, self.headers = base_url, headers
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.served: Counter[str] = Counter()
        self.done = 0
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(stream,), daemon=True)
            for stream in [True] * 8 + [False] * 8
        ]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _run(self, stream: bool) -> None:
        body = {"model": NAME, "prompt": "keep going", "max_tokens": 24, "stream": stream}
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120) as client:
            while not self.stop.is_set():
                try:
                    outcome = self._one(client, body)
                except httpx.HTTPError as exc:
                    outcome = f"transport: {type(exc).__name__}: {exc}"
                with self.lock:
                    self.done += 1
                    if outcome.startswith("v"):
                        self.served[outcome] += 1
                    else:
                        self.failures.append(outcome)

    @staticmethod
    def _one(client: httpx.Client, body: dict[str, Any]) -> str:
        if not body["stream"]:
            r = client.post("/v1/inference", json=body)
            if r.status_code != 200:
                return f"{r.status_code}: {r.text}"
            return r.headers.get("x-dify-model-version", "no header")
        with client.stream("POST", "/v1/inference", json=body) as r:
            if r.status_code != 200:
                r.read()
                return f"{r.status_code}: {r.text}"
            lines = list(r.iter_lines())
            if any(line.startswith("event: error") for line in lines):
                return f"stream error: {lines}"
            if lines[-2:] != ["data: [DONE]", ""] and "data: [DONE]" not in lines:
                return f"stream cut: {lines[-3:]}"
            return r.headers.get("x-dify-model-version", "no header")


def test_switches_drop_no_request(client: httpx.Client, base_url: str) -> None:
    spec = {
        "name": NAME,
        "modelId": "builtin:demo-llm",
        "task": "text-generation",
        "engine": "torch",
        "resources": {"cpus": 0.1},
        "generation": {"maxNewTokens": 32, "maxContextTokens": 128},
        "versions": VERSIONS,
    }
    assert client.post("/v1/models/load", json=spec).status_code == 202
    try:
        deadline = time.monotonic() + 300
        while (
            client.post(
                "/v1/inference", json={"model": NAME, "prompt": "x", "max_tokens": 1}
            ).status_code
            != 200
        ):
            assert time.monotonic() < deadline, "the versioned model never served"
            time.sleep(1)
        with Traffic(base_url, dict(client.headers)) as traffic:
            time.sleep(2)
            r = client.post(f"/v1/models/{NAME}/switch", json={"version": "v2"})
            assert r.status_code == 202, r.text
            busy = client.post(f"/v1/models/{NAME}/switch", json={"version": "v1"})
            assert busy.status_code == 409
            status = wait_rollout(client)
            assert status["rollout"]["phase"] == "Complete", status
            assert [(v["name"], v["weight"]) for v in status["versions"]] == [
                ("v1", 0),
                ("v2", 100),
            ]
            after_blue_green = traffic.done
            time.sleep(2)
            r = client.post(
                f"/v1/models/{NAME}/switch",
                json={"version": "v1", "strategy": "canary", "weight": 10},
            )
            assert r.status_code == 202, r.text
            status = wait_rollout(client)
            assert status["rollout"]["phase"] == "Complete", status
            time.sleep(2)
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.done > after_blue_green > 16
        assert set(traffic.served) == {"v1", "v2"}
        # the canary's share of 500 requests: binomial(500, 0.1) within 4 sigma
        served: Counter[str] = Counter()
        body = {"model": NAME, "prompt": "x", "max_tokens": 1}
        for _ in range(500):
            r = client.post("/v1/inference", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == f"{NAME}@{r.headers['x-dify-model-version']}"
            served[r.headers["x-dify-model-version"]] += 1
        assert abs(served["v1"] - 50) <= 4 * math.sqrt(500 * 0.1 * 0.9), served
    finally:
        client.post("/v1/models/unload", json={"name": NAME})
