"""The gateway application: FastAPI built per replica, served as a Ray Serve ingress.

The FastAPI app is built inside the replica (`__serve_build_asgi_app__`), from the options
in the Serve config, so switched-off modules have no routes at all (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from dify_serving.gateway import errors, metrics, openapi, policy, routers
from dify_serving.gateway.cache_header import CacheHeader
from dify_serving.gateway.dataplane import feedback
from dify_serving.gateway.limits import BodyLimit
from dify_serving.gateway.metrics import MetricsMiddleware
from dify_serving.gateway.protobuf_body import ProtobufBodies
from dify_serving.gateway.security import Guard, SecurityMiddleware
from dify_serving.gateway.served import VersionHeader
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions
from dify_serving.security.db import DatabaseError, unreachable
from dify_serving.security.secrets import Secrets

log = logging.getLogger(__name__)


def create_app(state: GatewayState, secrets: Secrets | None = None) -> FastAPI:
    """The FastAPI app; with security on, every /v1 request passes the guard first."""
    app = FastAPI(
        title="dify-mirror",
        version="0.1.0",
        description="Serve models and the knowledge they answer from. "
        'Errors are JSON: {"error": {"code", "message", "request_id"}}.',
        docs_url=None,  # served from the gateway's own assets (openapi.serve_docs)
        redoc_url=None,
    )
    app.state.gateway = state
    # innermost first: the body limit inside the guard (a refusal is audited, and a
    # client without a key is refused before its body is read), request ids outermost
    app.add_middleware(CacheHeader)  # X-Cache: only requests that got this far
    app.add_middleware(VersionHeader)  # X-Dify-Model-Version, for versioned models
    app.add_middleware(ProtobufBodies)  # inside the limit: protobuf bytes count too
    app.add_middleware(BodyLimit, limit=state.options.limits.max_body_bytes)
    security = state.options.security
    if security.enabled:
        guard = Guard(security, Path(state.options.home), secrets)
        app.state.guard = guard
        app.add_middleware(SecurityMiddleware, guard=guard)  # inside the request-id one
    if state.options.metrics_enabled:  # outside the guard: its refusals are counted too
        app.add_middleware(MetricsMiddleware)
    metrics.watch(state, app.state.guard.audit if security.enabled else None)
    feedback.watch(state)  # ratings and satisfaction, read at scrape time
    errors.install(app)
    app.add_exception_handler(DatabaseError, _database_error)
    routers.register(app, state.options.modules)
    openapi.serve_docs(app)
    policy.install(app)  # refuses a /v1 route that declares no rule
    openapi.complete(app, secured=security.enabled)
    return app


async def _database_error(request: Request, exc: Exception) -> Response:
    """Keys, tasks or ratings in a database that cannot be reached now: a 503 to retry
    (the catch-all 500 for any other database error)."""
    if not unreachable(exc):
        raise exc
    log.warning("database unreachable on %s: %s", request.url.path, type(exc).__name__)
    return errors.error_response(
        request,
        503,
        "database_unavailable",
        "the database is unavailable; retry shortly",
        {"Retry-After": "2"},
    )


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """The gateway replica.

    With `listen_port` set it also serves that port itself, with SO_REUSEPORT so every
    replica on a node shares it: a request then costs one process hop, where Serve's
    proxy adds a second one and two actor calls per request (what dominated CPU on two
    cores). Serve's own proxy keeps serving the same app on its port. With `grpc_port`
    set it serves DifyService there the same way (`rpc/server.py`).
    """

    async def __init__(self, **options: Any) -> None:  # type: ignore[misc]
        self.state = GatewayState(GatewayOptions.model_validate(options))
        self.fastapi = create_app(self.state)
        self.server: Any = None
        self.rpc: Any = None
        config, security = self.state.options, self.state.options.security
        tls = (
            (security.tls_certfile, security.tls_keyfile)
            if security.tls_certfile and security.tls_keyfile
            else None
        )
        if config.listen_port:
            self.server = await serve_directly(
                self.fastapi, config.listen_host or "127.0.0.1", config.listen_port, tls=tls
            )
        if config.grpc_port:
            from dify_serving.gateway.rpc.server import start_grpc

            self.rpc = await start_grpc(
                self.state,
                getattr(self.fastapi.state, "guard", None),
                self.fastapi.routes,
                config.grpc_host,
                config.grpc_port,
                tls=tls,
            )

    def __serve_build_asgi_app__(self) -> FastAPI:
        self.state.start()
        return self.fastapi

    async def __del__(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.rpc is not None:
            await self.rpc.stop()
        self.state.close()
        guard = getattr(self.fastapi.state, "guard", None)
        if guard is not None:
            guard.close()


async def serve_directly(
    app: FastAPI, host: str, port: int, tls: tuple[str, str] | None = None
) -> Any:
    """Run uvicorn for `app` on this replica's event loop (HTTPS with `tls`)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_keep_alive=30,
            # the guard decides whom to believe (trusted proxies), not uvicorn
            proxy_headers=False,
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
        )
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    self_task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    _SERVERS.add(self_task)
    return server


_SERVERS: set[asyncio.Task[None]] = set()


def build_gateway_app(args: dict[str, Any]) -> Any:
    """Serve application builder (the `import_path` of the gateway app)."""
    deployment: Any = Gateway
    return deployment.bind(**GatewayOptions.model_validate(args).model_dump())
