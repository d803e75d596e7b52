"""Batch requests: 64 greedy prompts in one `POST /v1/inference/batch` against 64 such
prompts as 64 concurrent `POST /v1/inference` requests.

Both reach the engine together (the batch runs its items concurrently inside the
gateway), so the figure is what one request saves over 64: the HTTP round trips, the
per-request guard and audit row, and the JSON of 64 bodies. The two take turns, the
order alternating per round.

Greedy answers are cached (`tasks/cache.py`), and a batch uses the cache without the
client's say, so every round sends prompts no earlier request sent (a round and mode tag
in front of the same words): both sides measure the engine, never the cache. That the
two give the same texts is checked once, on prompts of their own, the separate requests
sent with `Cache-Control: no-cache` after the batch.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from bench import load

#: Prompts per batch (the gateway's default `max_batch_requests`).
ITEMS = 64
MAX_NEW = 64
_WORDS = (
    "a batch of prompts enters the engine together so continuous batching fills its "
    "slots while one request carries many answers back in order"
).split(" ")


def batch_prompt(tag: str, i: int, n: int = 24) -> str:
    """Prompt `i` of a set: the same words for every `tag`, a key of its own in the cache."""
    return f"{tag} " + " ".join(_WORDS[(i * 5 + k) % len(_WORDS)] for k in range(n))


def _item(tag: str, i: int) -> dict[str, Any]:
    return {"prompt": batch_prompt(tag, i), "max_tokens": MAX_NEW, "temperature": 0}


async def one_batch(base: str, model: str, tag: str, items: int) -> tuple[float, list[str], int]:
    """Seconds for one batch of `items` prompts, its texts in order, completion tokens."""
    body = {"model": model, "requests": [_item(tag, i) for i in range(items)]}
    result = await load.run(base, "/v1/inference/batch", lambda _: body, 1, 1, keep_bodies=True)
    answer = json.loads(result.bodies[0])
    assert result.errors == 0, answer
    results = answer["results"]
    assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"]
    return result.seconds, [r["output"] for r in results], answer["usage"]["completion_tokens"]


async def separate(base: str, model: str, tag: str, items: int) -> tuple[float, list[str], int]:
    """Seconds for the same prompts as `items` concurrent requests, texts, tokens."""

    def body(i: int) -> dict[str, Any]:
        return {"model": model, **_item(tag, i)}

    result = await load.run(base, "/v1/inference", body, items, items, keep_bodies=True)
    assert result.errors == 0, result.bodies[:1]
    answers = [json.loads(b) for b in result.bodies]
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return result.seconds, [a["output"] for a in answers], tokens


async def same_texts(base: str, model: str, items: int) -> int:
    """Items whose batch text is the text of the same prompt sent alone, afresh."""
    _, batched, _ = await one_batch(base, model, "check", items)
    with load.uncached("no-cache"):
        _, alone, _ = await separate(base, model, "check", items)
    return sum(a == b for a, b in zip(batched, alone, strict=True))


async def batch_rows(
    base: str, engine: str, model: str = "demo-llm", rounds: int = 5, items: int = ITEMS
) -> list[tuple[str, str, str, str]]:
    """One row: the batch's wall time and tokens/s against the separate requests'."""
    await one_batch(base, model, "warm-b", items)  # warm both at this level
    await separate(base, model, "warm-s", items)
    batched: list[tuple[float, int]] = []
    apart: list[tuple[float, int]] = []
    for r in range(rounds):
        turns = [(one_batch, f"r{r}b", batched), (separate, f"r{r}s", apart)]
        for measure, tag, into in turns[:: -1 if r % 2 else 1]:
            seconds, _, tokens = await measure(base, model, tag, items)
            into.append((seconds, tokens))
    same = await same_texts(base, model, items)
    one = statistics.median(s for s, _ in batched)
    many = statistics.median(s for s, _ in apart)
    rate = statistics.median(t / s for s, t in batched)
    rate_apart = statistics.median(t / s for s, t in apart)
    ratio = statistics.median(
        (t / s) / (ta / sa) for (s, t), (sa, ta) in zip(batched, apart, strict=True)
    )
    return [
        (
            f"batch of {items} greedy prompts in one POST /v1/inference/batch, "
            f"{MAX_NEW} new tokens ({model}: {engine})",
            f"{rate:.0f} tok/s ({one * 1000:.0f} ms)",
            f"{items} concurrent POST /v1/inference: {rate_apart:.0f} tok/s ({many * 1000:.0f} ms)",
            f"{ratio:.2f}×; the same text as alone {same}/{items}",
        )
    ]
