"""Every gateway error as a gRPC status, in one place (`gateway/errors.py` is HTTP's).

The error keeps its meaning across transports: the HTTP status picks the gRPC code
(Google's AIP-193 table), the message is the same safe text, and the rich error
details (`grpc-status-details-bin`, `google.rpc.Status`) carry what a REST client reads
from the JSON body and headers: `ErrorInfo` with the stable `code` as its reason and
the request id, and `RetryInfo` where REST sends `Retry-After` (429, 503).

413 (a body over a bound) is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: RESOURCE_EXHAUSTED
means "wait and retry" here, always with RetryInfo; a request that is too large fails
again however long the client waits.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from dify_serving.errors import DifyError

#: The domain of every ErrorInfo the gateway sends.
DOMAIN = "difymirror.dev"

_BY_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(status: int, code: str = "") -> grpc.StatusCode:
    """The gRPC code of an HTTP-style error status (and its stable `code`)."""
    if status == 409 and code.endswith("_exists"):
        return grpc.StatusCode.ALREADY_EXISTS
    found = _BY_STATUS.get(status)
    if found is not None:
        return found
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


def retry_seconds(error: DifyError) -> int | None:
    """The error's Retry-After in whole seconds, if it has one."""
    value = (error.headers or {}).get("Retry-After")
    if value is None and error.status == 503:
        return 1  # busy or restarting: worth a retry (as the HTTP handler says)
    if value is None:
        return None
    text = str(value)
    return int(text) if text.isdigit() else None


@dataclass(frozen=True, slots=True)
class RpcStatus:
    """What `context.abort` takes: the code, the message, the details as trailers."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def rpc_status_of(error: DifyError, request_id: str) -> RpcStatus:
    """`error` as a gRPC status with ErrorInfo (and RetryInfo when it has a Retry-After)."""
    code = grpc_code(error.status, error.code)
    info = error_details_pb2.ErrorInfo(
        reason=error.code,
        domain=DOMAIN,
        metadata={"request_id": request_id, "http_status": str(error.status)},
    )
    details = [_pack(info)]
    seconds = retry_seconds(error)
    if seconds is not None:
        delay = duration_pb2.Duration(seconds=seconds)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=error.message, details=details)
    )
    return RpcStatus(
        code=status.code,
        details=status.details,
        trailing_metadata=(*status.trailing_metadata, ("x-request-id", request_id)),
    )


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
