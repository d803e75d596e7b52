"""How calls between deployments fail, and how a silent stream is ended.

Clients get documented codes, never a transport's own text (`AioRpcError`, Ray exception
reprs, tracebacks: they name internal addresses and say nothing a client can act on);
the details go to the gateway's log. A message over gRPC's limit between deployments
(RESOURCE_EXHAUSTED) is the one transport failure a client can fix, so it is a 413 that
names the limit; every other one is a 503 "<kind> unavailable" with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import RayTaskError

from dify_serving.errors import DifyError
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.limits import GRPC_DEFAULT_BYTES, replica_message_bytes

log = logging.getLogger(__name__)


def unwrap(exc: BaseException) -> BaseException:
    """The replica's own exception out of Ray's wrapper."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, DifyError):
        return exc.cause
    return exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _too_large_for_transport(exc: BaseException) -> bool:
    """A gRPC RESOURCE_EXHAUSTED: the request or the reply outgrew the message limit."""
    import grpc

    seen: BaseException | None = exc
    for _ in range(5):  # the error, or what it wraps
        if seen is None:
            return False
        if isinstance(seen, grpc.aio.AioRpcError):
            return bool(seen.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        seen = seen.__cause__ or seen.__context__
    return False


def transport_failure(exc: BaseException, kind: str, name: str) -> ApiError:
    """A documented error for a call that failed on its way; the details go to the log.

    Never the transport's own text (`AioRpcError`, Ray exception reprs): it names
    internal addresses and says nothing a client can act on.
    """
    if _too_large_for_transport(exc):
        limit = replica_message_bytes() or GRPC_DEFAULT_BYTES
        log.warning("%s %s: message over the transport limit: %s", kind, name, _first_line(exc))
        return ApiError(
            413,
            "payload_too_large",
            f"the call to {kind} {name!r} or its answer is larger than one call between "
            f"deployments carries ({limit} bytes, RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH); "
            "send or ask for less per request (fewer texts, smaller documents, a lower top_k)",
        )
    log.warning("%s %s unavailable: %s: %s", kind, name, type(exc).__name__, _first_line(exc))
    return ApiError(
        503,
        f"{kind}_unavailable",
        f"{kind} {name!r} is unavailable; retry shortly",
        headers={"Retry-After": "2"},
    )


def replica_failure(exc: BaseException, kind: str, name: str) -> Exception:
    """The replica's own refusal (a DifyError), or a 500 that keeps its traceback in the log."""
    cause = unwrap(exc)
    if isinstance(cause, DifyError):
        return cause
    log.error("%s %s failed: %s", kind, name, exc)
    return ApiError(
        500, f"{kind}_error", f"{kind} {name!r} failed on this request; see the server logs"
    )


class IdleWatch:
    """Cancels a replica stream that sent nothing for `idle` seconds.

    One timer per stream, re-armed only when it fires: an event costs one float store.
    """

    __slots__ = ("_loop", "_timer", "fired", "idle", "last", "response")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float, response: Any) -> None:
        self._loop, self.idle, self.response = loop, idle, response
        self.last = loop.time()
        self.fired = False
        self._timer = loop.call_later(idle, self._check)

    def _check(self) -> None:
        quiet = self._loop.time() - self.last
        if quiet < self.idle:
            self._timer = self._loop.call_later(self.idle - quiet, self._check)
            return
        self.fired = True
        self.response.cancel()

    def stop(self) -> None:
        self._timer.cancel()
