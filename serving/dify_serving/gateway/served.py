"""`X-Dify-Model-Version`: which version of a versioned model answered a request.

The version is drawn deep in the data plane (`GatewayState.served`), per request, so
this pure ASGI middleware puts one mutable `Served` in a context variable for each
request, the data plane writes the version into it (`record`), and the header is added
when the response starts. The object is mutated, never re-set, so a version drawn in a
child task (a stream) still reaches the header. Unversioned models set no header.
"""

from __future__ import annotations

from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-dify-model-version"


class Served:
    __slots__ = ("version",)

    def __init__(self) -> None:
        self.version: str | None = None


SERVED: ContextVar[Served | None] = ContextVar("dify_served", default=None)


def record(version: str) -> None:
    served = SERVED.get()
    if served is not None:
        served.version = version


class VersionHeader:
    """Pure ASGI: the served version's header on the response, when one was drawn."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        served = Served()
        token = SERVED.set(served)

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start" and served.version is not None:
                headers = list(message.get("headers", []))
                headers.append((HEADER, served.version.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_version)
        finally:
            SERVED.reset(token)
