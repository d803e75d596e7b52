"""One JSON error shape for every failure: `{"error": {"code", "message", "request_id"}}`.

A pure ASGI middleware gives each request an id (from `X-Request-ID` or a new one) and
echoes it; the exception handlers turn every error, including ones we did not foresee,
into the shape above, so no stack trace ever reaches a client.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dify_serving.errors import DifyError
from dify_serving.gateway.metrics import ERRORS
from dify_serving.specs import MODEL_REF_PATTERN, NAME_PATTERN

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(DifyError):
    """An error the gateway itself raises (the request, not a replica, is at fault)."""


def request_id(request: Request) -> str:
    rid: str = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
    return rid


def error_body(code: str, message: str, rid: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": rid}}


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    rid: str,
    headers: dict[str, str] | None = None,
) -> None:
    """The error shape over raw ASGI, for middleware that answers before FastAPI."""
    ERRORS.labels(code).inc()
    body = json.dumps(error_body(code, message, rid)).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    ERRORS.labels(code).inc()
    return JSONResponse(
        error_body(code, message, request_id(request)), status_code=status, headers=headers
    )


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    """The field's path, without FastAPI's leading location (a field may be `query`)."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


_NAME_RULE = (
    "must be a Kubernetes name: lowercase letters, digits and '-', starting and "
    "ending with a letter or digit, at most 63 characters"
)


def _message(error: Any) -> str:
    if error.get("type") == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern")
        if pattern == NAME_PATTERN:
            return _NAME_RULE
        if pattern == MODEL_REF_PATTERN:
            return f"{_NAME_RULE}, optionally followed by @version (a version's name)"
    return str(error.get("msg", "invalid"))


def describe_validation(errors: list[Any]) -> str:
    return "; ".join(f"{_field(e.get('loc', ()))}: {_message(e)}" for e in errors)


def invalid_body(errors: list[Any]) -> ApiError:
    """A body the schema refused: 413 for a bound on size (`schemas.py`), else 422."""
    if any(e.get("type") == "too_large" for e in errors):
        return ApiError(413, "payload_too_large", describe_validation(errors))
    return ApiError(422, "invalid_request", describe_validation(errors))


class RequestIdMiddleware:
    """Sets `scope["state"]["request_id"]` and, unless a proxy did, `X-Request-ID`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value.decode("latin-1")[:128]
                break
        scope.setdefault("state", {})["request_id"] = rid or uuid.uuid4().hex
        if rid is not None:  # Ray Serve's proxy set it and echoes it in the response
            await self.app(scope, receive, send)
            return
        header = (b"x-request-id", scope["state"]["request_id"].encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def install(app: FastAPI) -> None:
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(DifyError)
    async def _dify(request: Request, exc: DifyError) -> JSONResponse:
        headers = exc.headers
        if headers is None and exc.status == 503:  # busy or restarting: worth a retry
            headers = {"Retry-After": "1"}
        return error_response(request, exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(request, 400, "malformed_json", "request body is not valid JSON")
        refused = invalid_body(errors)
        return error_response(request, refused.status, refused.code, refused.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI says 400 "error parsing"
            bad = exc.__cause__
            return error_response(
                request,
                422,
                "invalid_encoding",
                f"request body is not valid UTF-8 (byte 0x{bad.object[bad.start]:02x} at "
                f"offset {bad.start}); send text as UTF-8 JSON",
            )
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(request, exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal_error", "internal error; see server logs")
