"""Async tasks: 1,000 generation tasks submitted at once against the same prompts sent
synchronously at concurrency 16.

The async side is `POST /v1/inference/async` for every prompt (64 connections), then
`GET /v1/tasks/{id}` until the last one has ended; its figure is the time from the
first submission to the last task COMPLETED, and how many tasks were lost or failed
(must be none). The anchor sends the same prompts (a tag of their own per round, so no
answer comes from the result cache) to `POST /v1/inference` on 16 connections. The two
take turns, the order alternating per round.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from bench import load

TASKS = 1000
SYNC_CONCURRENCY = 16
SUBMIT_CONNECTIONS = 64
MAX_NEW = 32
_WORDS = (
    "a queue takes the work at once and the consumers run it while the client polls "
    "for the answer instead of holding a connection open"
).split(" ")


def task_prompt(tag: str, i: int, n: int = 16) -> str:
    return f"{tag}-{i} " + " ".join(_WORDS[(i * 3 + k) % len(_WORDS)] for k in range(n))


def _body(model: str, tag: str, i: int) -> dict[str, Any]:
    return {"model": model, "prompt": task_prompt(tag, i), "max_tokens": MAX_NEW, "temperature": 0}


async def sync_round(base: str, model: str, tag: str, total: int) -> tuple[float, int]:
    """Seconds for `total` prompts at concurrency 16, and failed requests."""
    result = await load.run(
        base, "/v1/inference", lambda i: _body(model, tag, i), total, SYNC_CONCURRENCY
    )
    return result.seconds, result.errors


async def async_round(base: str, model: str, tag: str, total: int) -> tuple[float, float, int]:
    """Seconds until every task COMPLETED, seconds to submit them all, and tasks that did
    not complete (lost, failed or never accepted)."""
    started = time.perf_counter()
    submitted = await load.run(
        base,
        "/v1/inference/async",
        lambda i: _body(model, tag, i),
        total,
        SUBMIT_CONNECTIONS,
        keep_bodies=True,
    )
    accepted = time.perf_counter() - started
    ids = []
    for body in submitted.bodies:
        answer = json.loads(body)
        if "task_id" in answer:
            ids.append(answer["task_id"])
    # the queue is FIFO: wait for the last one, then read every task
    while (await _statuses(base, ids[-1:], 1))[0] in ("PENDING", "RUNNING"):
        await asyncio.sleep(0.05)
    statuses = await _statuses(base, ids)
    while any(s in ("PENDING", "RUNNING") for s in statuses):
        await asyncio.sleep(0.05)
        statuses = await _statuses(base, ids)
    finished = time.perf_counter() - started
    incomplete = (total - len(ids)) + sum(s != "COMPLETED" for s in statuses)
    return finished, accepted, incomplete


async def _statuses(base: str, ids: list[str], connections: int = 32) -> list[str]:
    """Every task's status, read on a few persistent connections."""
    host, port = base.removeprefix("http://").split(":")
    out = [""] * len(ids)
    todo = iter(range(len(ids)))

    async def reader() -> None:
        conn = load.Connection(host, int(port))
        try:
            for i in todo:
                _, body = await conn.post(f"/v1/tasks/{ids[i]}", None)
                out[i] = json.loads(body)["status"]
        finally:
            conn.close()

    await asyncio.gather(*(reader() for _ in range(connections)))
    return out


async def task_rows(
    base: str, engine: str, model: str = "demo-llm", rounds: int = 2, total: int = TASKS
) -> list[tuple[str, str, str, str]]:
    await sync_round(base, model, "warm-s", 64)
    await async_round(base, model, "warm-a", 64)
    done: list[float] = []
    accept: list[float] = []
    sync: list[float] = []
    lost = failed = 0
    for r in range(rounds):
        turns = ["async", "sync"][:: -1 if r % 2 else 1]
        for turn in turns:
            if turn == "async":
                seconds, accepted, incomplete = await async_round(base, model, f"a{r}", total)
                done.append(seconds)
                accept.append(accepted)
                lost += incomplete
            else:
                seconds, errors = await sync_round(base, model, f"s{r}", total)
                sync.append(seconds)
                failed += errors
    a, s = statistics.median(done), statistics.median(sync)
    return [
        (
            f"async {total} generation tasks submitted at once, {MAX_NEW} new tokens "
            f"({model}: {engine})",
            f"all COMPLETED in {a:.1f} s (accepted in {statistics.median(accept):.1f} s); "
            f"{lost} lost or failed",
            f"the same prompts sync at concurrency {SYNC_CONCURRENCY}: {s:.1f} s ({failed} failed)",
            f"{s / a:.2f}×",
        )
    ]
