"""A small closed-loop HTTP/1.1 load generator on raw asyncio streams.

httpx costs more CPU per request than the server path being measured, on the same two
cores; this client keeps one persistent connection per worker and parses only what it
needs (status, Content-Length, or SSE until `[DONE]`). For a streamed answer it notes
when the first chunk arrived: the time to first token of an SSE stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    #: Seconds from sending to the first body chunk, per chunked (streamed) answer.
    first_chunks: list[float] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


#: Sent with every request (the stack's bootstrap admin key, when auth is on).
HEADERS: dict[str, str] = {}


@contextmanager
def uncached(wish: str = "no-store") -> Iterator[None]:
    """Connections opened inside send `Cache-Control: <wish>`, so the result cache neither
    answers nor (with no-store) keeps: a row that times an engine must not time a hit."""
    HEADERS["Cache-Control"] = wish
    try:
        yield
    finally:
        del HEADERS["Cache-Control"]


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
        #: perf_counter() when the last answer's first chunk arrived (chunked answers).
        self.first_chunk: float | None = None

    async def post(self, path: str, body: bytes | None) -> tuple[int, bytes]:
        """POST `body` (JSON), or GET when `body` is None."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        if body is None:
            head = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.extra}\r\n".encode()
            body = b""
        else:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, chunked = None, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            if key.lower() == "content-length":
                length = int(value)
            elif key.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if length is not None:
            return status, await self.reader.readexactly(length)
        if chunked:
            parts: list[bytes] = []
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                if size == 0:
                    await self.reader.readline()
                    return status, b"".join(parts)
                parts.append(await self.reader.readexactly(size))
                if self.first_chunk is None:
                    self.first_chunk = time.perf_counter()
                await self.reader.readline()
        return status, await self.reader.read()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run(
    base: str,
    path: str,
    make_body: Callable[[int], dict[str, Any] | None],
    total: int,
    concurrency: int,
    keep_bodies: bool = False,
) -> Result:
    host, port = base.removeprefix("http://").split(":")
    result = Result()
    counter = iter(range(total))
    if keep_bodies:
        result.bodies = [b""] * total  # in request order, whatever order answers come in
    connections = [Connection(host, int(port)) for _ in range(concurrency)]

    async def worker(conn: Connection) -> None:
        for i in counter:
            made = make_body(i)
            payload = None if made is None else json.dumps(made).encode()
            conn.first_chunk, t0 = None, time.perf_counter()
            status, body = await conn.post(path, payload)
            result.latencies.append(time.perf_counter() - t0)
            if conn.first_chunk is not None:
                result.first_chunks.append(conn.first_chunk - t0)
            result.requests += 1
            if status != 200:
                result.errors += 1
            if keep_bodies:
                result.bodies[i] = body

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    result.seconds = time.perf_counter() - start
    for c in connections:
        c.close()
    return result
