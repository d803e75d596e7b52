"""The gRPC port (9000): DifyService, server reflection and the standard health service.

Served by each gateway replica itself on its own event loop, beside the HTTP port it
serves (`app.serve_directly`), with SO_REUSEPORT so the replicas on a node share the
port. Ray Serve's gRPC proxy was the other choice; it adds the proxy's process hop and
two actor calls per request, the cost that made the HTTP port direct too
(`bench/grpc.py` measures both, see docs/benchmarks.md). TLS takes the HTTPS
certificate settings (`DIFY_MIRROR_TLS_CERTFILE`/`KEYFILE`). A message is bounded by the
HTTP body limit (`DIFY_MIRROR_MAX_BODY_BYTES`); gRPC refuses a larger one itself
(RESOURCE_EXHAUSTED) before any of it is parsed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dify_serving.gateway.rpc.servicer import SERVICE, DifyServicer
from dify_serving.gateway.security import Guard
from dify_serving.gateway.state import GatewayState
from dify_serving.grpc import dify_pb2_grpc

#: Seconds a stopping server gives calls in flight.
GRACE_S = 5.0


class _Symbols:
    """The default descriptor pool for reflection, where a method's full name finds its
    file too: upb's pool finds services and messages only, so `grpcurl describe
    difymirror.v1.DifyService.GenerateText` answered "Symbol not found"."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            return self._pool.FindMethodByName(symbol).containing_service.file


class RpcServer:
    """One replica's gRPC server and its health service."""

    def __init__(self, server: grpc.aio.Server, health: health.aio.HealthServicer) -> None:
        self.server = server
        self.health = health

    async def stop(self) -> None:
        """NOT_SERVING first (balancers stop sending), then finish the calls in flight."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(GRACE_S)


async def start_grpc(
    state: GatewayState,
    guard: Guard | None,
    routes: Any,
    host: str,
    port: int,
    tls: tuple[str, str] | None = None,
) -> RpcServer:
    """Start DifyService with reflection and health on `host:port` (TLS with `tls`)."""
    limit = state.options.limits.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
        ]
    )
    dify_pb2_grpc.add_DifyServiceServicer_to_server(DifyServicer(state, guard, routes), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE, health_service, reflection.SERVICE_NAME),
        server,
        _Symbols(descriptor_pool.Default()),
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        key, cert = Path(tls[1]).read_bytes(), Path(tls[0]).read_bytes()
        server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RpcServer(server, checker)
