"""Result cache benchmark: a cached answer against the same request answered afresh.

Two requests, each sent alternately as is (a hit, after the first) and with
`Cache-Control: no-cache` (the full path: the fresh answer is computed, and kept), one at
a time over two persistent connections, taking turns which goes first so drift on the
shared cores hits both; p50 of each. The fresh and the cached answers are compared, so a
figure is only reported for a cache that answers what the full path answers.

- `/v1/data/search` by query text: a miss tokenizes and embeds the query and searches
  the index; a hit is answered by the index replica from its cache.
- greedy `/v1/inference` (temperature 0): a miss generates; a hit is answered by the
  gateway from its cache without calling the model.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from bench import load

#: Rounds per figure: each round times one hit and one miss.
SEARCH_ROUNDS = 200
INFERENCE_ROUNDS = 40
INFERENCE_TOKENS = 32


async def _paired(
    base: str, path: str, body: dict[str, Any], rounds: int, same: Any
) -> tuple[float, float]:
    """(hit p50, miss p50) in seconds; `same(hit_body, miss_body)` checks the answers."""
    host, port = base.removeprefix("http://").split(":")
    hit, miss = load.Connection(host, int(port)), load.Connection(host, int(port))
    miss.extra += "Cache-Control: no-cache\r\n"
    payload = json.dumps(body).encode()
    times: dict[str, list[float]] = {"hit": [], "miss": []}
    try:
        for conn in (miss, hit, miss, hit):  # warm both connections; the cache holds it
            status, _ = await conn.post(path, payload)
            assert status == 200, status
        for r in range(rounds):
            turns = [("hit", hit), ("miss", miss)]
            answers = {}
            for name, conn in turns[::-1] if r % 2 else turns:
                t0 = time.perf_counter()
                status, answer = await conn.post(path, payload)
                times[name].append(time.perf_counter() - t0)
                assert status == 200, answer[:300]
                answers[name] = json.loads(answer)
            assert same(answers["hit"], answers["miss"]), "the cached answer differs"
    finally:
        hit.close()
        miss.close()
    return statistics.median(times["hit"]), statistics.median(times["miss"])


def _row(figure: str, hit: float, miss: float) -> tuple[str, str, str, str]:
    return (
        figure,
        f"hit p50 {hit * 1000:.2f} ms",
        f"miss (Cache-Control: no-cache) p50 {miss * 1000:.1f} ms",
        f"{miss / hit:.0f}× faster",
    )


async def cache_rows(
    base: str, index: str, model: str = "demo-llm", query: str = "harbour cranes and cargo"
) -> list[tuple[str, str, str, str]]:
    """Hit against miss for a search of `index` by text and a greedy generation of `model`."""
    search = {"index": index, "query": query, "top_k": 10}
    hit, miss = await _paired(
        base,
        "/v1/data/search",
        search,
        SEARCH_ROUNDS,
        lambda a, b: a["hits"] == b["hits"],
    )
    rows = [_row(f"cache: /v1/data/search by text ({index}), hit against miss", hit, miss)]
    greedy = {"model": model, "prompt": "The harbour at dawn", "max_tokens": INFERENCE_TOKENS}
    greedy["temperature"] = 0
    hit, miss = await _paired(
        base,
        "/v1/inference",
        greedy,
        INFERENCE_ROUNDS,
        lambda a, b: a["output"] == b["output"],
    )
    rows.append(
        _row(
            f"cache: greedy /v1/inference ({model}, {INFERENCE_TOKENS} tokens), hit against miss",
            hit,
            miss,
        )
    )
    return rows
