"""Scale-to-zero: the first request to a sleeping model against a warm request.

`minilm-sleepy` is MiniLM with `autoscaling: {minReplicas: 0, idleTimeoutS: 2}`. Each
round waits until the gateway's status says the model is scaled to zero, then times one
embedding request (Serve queues it, starts a replica, the replica loads the weights and
answers) and, right after, the same request on the replica it woke (the anchor). The
status's own `last_cold_start_s` (what the gateway measured for that request) is
reported beside the client's figure.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

from bench import load

MODEL = "minilm-sleepy"
ROUNDS = 3
#: Longest wait for Serve to scale the model to zero (its 30 s look-back, then the idle
#: timeout, then the control loop).
SLEEP_TIMEOUT_S = 240


def model_doc() -> dict[str, Any]:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": MODEL},
        "spec": {
            "modelId": "sentence-transformers/all-MiniLM-L6-v2",
            "task": "feature-extraction",
            "resources": {"cpus": 2},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "idleTimeoutS": 2},
        },
    }


def _status(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/v1/models/status")
    r.raise_for_status()
    return next(m for m in r.json()["models"] if m["name"] == MODEL)


def _asleep(client: httpx.Client) -> float:
    """Until the model is scaled to zero; returns how long that took."""
    started = time.monotonic()
    while not _status(client).get("scaled_to_zero"):
        if time.monotonic() - started > SLEEP_TIMEOUT_S:
            raise TimeoutError(f"{MODEL} never scaled to zero")
        time.sleep(1)
    return time.monotonic() - started


def _embed(client: httpx.Client, text: str) -> float:
    t0 = time.perf_counter()
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": text})
    took = time.perf_counter() - t0
    assert r.status_code == 200, r.text[:300]
    return took


def cold_start_rows(base: str) -> list[tuple[str, str, str, str]]:
    cold, warm, reported, idle = [], [], [], []
    with httpx.Client(base_url=base, headers=load.HEADERS, timeout=300) as client:
        for i in range(ROUNDS):
            idle.append(_asleep(client))
            cold.append(_embed(client, f"wake up, round {i}"))
            warm.append(statistics.median(_embed(client, f"awake {i}.{k}") for k in range(5)))
            deadline = time.monotonic() + 30
            while (seconds := _status(client).get("last_cold_start_s")) is None:
                assert time.monotonic() < deadline, "the status never showed the cold start"
                time.sleep(0.5)
            reported.append(float(seconds))
            print(
                f"  round {i}: asleep after {idle[-1]:.0f} s, cold {cold[-1]:.2f} s "
                f"(status {reported[-1]:.2f} s), warm {warm[-1] * 1000:.1f} ms",
                flush=True,
            )
    c, w = statistics.median(cold), statistics.median(warm)
    return [
        (
            "cold start: first request to a model scaled to zero "
            f"(MiniLM, minReplicas 0, idleTimeoutS 2; asleep {statistics.median(idle):.0f} s "
            "after its last request)",
            f"{c:.2f} s p50 of {ROUNDS} (status: {statistics.median(reported):.2f} s)",
            f"{w * 1000:.1f} ms (warm request, same replica)",
            f"{c / w:.0f}× (the price of sleeping)",
        )
    ]
