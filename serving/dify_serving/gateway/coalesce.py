"""Concurrent embedding requests to one model ride one replica call.

Each call through a Serve handle costs the gateway and the replica a fixed amount of
CPU (routing, serialization, a gRPC round trip), which at one short text per request
was most of the gateway's cost. Requests that arrive while calls are in flight wait and
go together in the next one (natural batching: no timer, so an idle gateway adds no
latency). At most `IN_FLIGHT` calls per model run at once, enough to keep the engine's
own continuous batching busy. Errors stay per request: the engine tokenizes each one
apart and answers an over-long input with its own error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dify_serving.engines.base import EngineError

IN_FLIGHT = 4
MAX_REQUESTS = 16


class EmbedCoalescer:
    def __init__(self, call: Any) -> None:
        self._call = call  # async (requests) -> list of results
        self._pending: list[tuple[list[str], bool, asyncio.Future[dict[str, Any]]]] = []
        self._running = 0

    async def embed(self, texts: list[str], truncate: bool) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((texts, truncate, future))
        if self._running < IN_FLIGHT:
            self._running += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_REQUESTS]
                del self._pending[:MAX_REQUESTS]
                try:
                    results = await self._call([(t, tr) for t, tr, _ in batch])
                except BaseException as exc:
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (*_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if "error" in result:
                        future.set_exception(EngineError(*result["error"]))
                    else:
                        future.set_result(result)
        finally:
            self._running -= 1
