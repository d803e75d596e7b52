"""How much one request may carry, checked before anything parses it.

`BodyLimit` is a pure ASGI middleware in front of FastAPI: a body over
`DIFY_MIRROR_MAX_BODY_BYTES` is refused with 413 by its Content-Length before a byte is
read, and a chunked upload (no Content-Length) is read up to the limit and refused the
moment it passes it, so neither reaches the JSON parser, let alone a replica. It sits
inside the security middleware: an unauthenticated client is refused before its body is
read at all, and every 413 leaves an audit row.

A body within the limit can still be too big for one call between deployments: with
gRPC between them (`RAY_SERVE_USE_GRPC_BY_DEFAULT=1`, the local stack's fast path) Ray
Serve refuses a message over `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH` (4 MiB by
default). `call_budget()` is the share of that a request may fill, so routes refuse
or split before calling instead of shipping a body the transport will drop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dify_serving.gateway.errors import ApiError, send_error

MIB = 1024 * 1024
#: Ray Serve's own default for `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`.
GRPC_DEFAULT_BYTES = 4 * MIB
_BODILESS = frozenset(("GET", "HEAD", "OPTIONS", "DELETE"))


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413 (see the module docstring)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked = None, False
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if not chunked and (length is not None or scope["method"] in _BODILESS):
            if length is not None and length.isdigit() and int(length) > self.limit:
                await self._refuse(scope, send, "payload_too_large")
                return
            await self.app(scope, receive, send)  # the server reads no more than that
            return
        body, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-upload
                await self._refuse(scope, send, "client_disconnected")  # for the audit row
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, send, "payload_too_large")
                return
            body.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, replay_body(b"".join(body), receive), send)

    async def _refuse(self, scope: Scope, send: Send, code: str) -> None:
        if code == "payload_too_large":
            status, message = (
                413,
                f"request body is over {self.limit} bytes (DIFY_MIRROR_MAX_BODY_BYTES="
                f"{self.limit}); send less per request",
            )
        else:
            status, message = 400, "the request body ended early (the client disconnected)"
        await send_error(send, status, code, message, scope.get("state", {}).get("request_id", ""))


def replay_body(body: bytes, receive: Receive) -> Receive:
    """The buffered body once, then the real channel (disconnects during a stream)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def replica_message_bytes() -> int | None:
    """Largest message one call between deployments may carry; None: no such limit."""
    if os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0") != "1":
        return None  # actor calls: large arguments travel through the object store
    raw = os.environ.get("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", "")
    return int(raw) if raw.isdigit() else GRPC_DEFAULT_BYTES


def call_budget() -> int | None:
    """Bytes of text one replica call may carry: 3/4 of the transport's limit (the rest
    is framing, pickling and the call's other arguments)."""
    limit = replica_message_bytes()
    return None if limit is None else limit * 3 // 4


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8; free for ASCII (Python knows its length)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_call_size(field: str, texts: Iterable[str], what: str) -> None:
    """413 when `texts` would not fit into one call between deployments."""
    budget = call_budget()
    if budget is not None:
        check_call_bytes(field, sum(utf8_size(t) for t in texts), what, budget)


def check_call_bytes(field: str, size: int, what: str, budget: int) -> None:
    """413 when `size` bytes (already measured) are over one call's `budget`."""
    if size > budget:
        raise ApiError(
            413,
            "payload_too_large",
            f"{field}: {size} bytes in all; one call to {what} carries at most {budget} "
            f"(3/4 of RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH); split the request",
        )


def json_size(value: Any) -> int:
    """Bytes of `value` as compact JSON (what a store keeps of metadata)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
