"""DifyService: the gateway's gRPC transport, a thin adapter over the same data plane.

Each RPC has a REST twin (`TWINS`) and takes its rule from the policy table the routers
declare, so a call needs exactly the scopes, second factor and rate limits of the route
it mirrors, and a module switched off has neither (UNIMPLEMENTED). The guard is the
HTTP middleware's (`Guard.admit`, `Guard.limit`, `Guard.record`): the key comes from
the `authorization` metadata, the second factor from `x-dify-otp`, the address from the
peer, or from `x-forwarded-for` only when the peer is a trusted proxy. Each call leaves
one audit row (method `GRPC`, route `/difymirror.v1.DifyService/<Rpc>`) and one count in
the request metrics, refused or not.

A message becomes the REST body's dict (`grpc/codec.py`) and is checked by the same
pydantic model, so a bound holds on both transports. Errors become statuses in one place
(`rpc/status.py`). The client's deadline bounds the work: past it the call ends
DEADLINE_EXCEEDED and its generation is cancelled, as it is when the client cancels.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from dify_serving.errors import DifyError
from dify_serving.gateway import served
from dify_serving.gateway.dataplane import data, inference, models, tasks
from dify_serving.gateway.errors import ApiError, invalid_body
from dify_serving.gateway.metrics import ERRORS, IN_FLIGHT, LATENCY, REFUSALS, REQUESTS
from dify_serving.gateway.notes import REQUEST, RequestContext
from dify_serving.gateway.policy import Rule, rules_of
from dify_serving.gateway.rpc.status import rpc_status_of
from dify_serving.gateway.schemas import (
    AsyncInferenceRequest,
    DeleteRequest,
    EmbedRequest,
    InferenceRequest,
    SearchRequest,
    UpsertRequest,
)
from dify_serving.gateway.security import Guard, Refusal
from dify_serving.gateway.state import GatewayState
from dify_serving.grpc import dify_pb2 as pb
from dify_serving.grpc import dify_pb2_grpc
from dify_serving.grpc.codec import from_dict, to_dict
from dify_serving.security.audit import AuditEntry
from dify_serving.specs import Task

log = logging.getLogger(__name__)

SERVICE = "difymirror.v1.DifyService"
#: Each RPC's REST twin: (method, route template) in the policy table.
TWINS: dict[str, tuple[str, str]] = {
    "GenerateText": ("POST", "/v1/inference"),
    "GenerateTextStream": ("POST", "/v1/inference"),
    "Embed": ("POST", "/v1/data/embed"),
    "VectorSearch": ("POST", "/v1/data/search"),
    "Upsert": ("POST", "/v1/data/upsert"),
    "Delete": ("POST", "/v1/data/delete"),
    "SubmitTask": ("POST", "/v1/inference/async"),
    "GetTask": ("GET", "/v1/tasks/{task_id}"),
    "GetModelStatus": ("GET", "/v1/models/status"),
}
_WANTED = frozenset(("authorization", "x-forwarded-for", "x-dify-otp", "x-dify-subject"))
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
B = TypeVar("B", bound=BaseModel)
R = TypeVar("R", bound=Message)


def peer_address(peer: str) -> str | None:
    """The IP of a gRPC peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`); None otherwise."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]").split("%")[0] or None
    return None


def body(model: type[B], message: Message) -> B:
    """The REST model of `message`: the same bounds, the same 422/413 messages."""
    try:
        return model.model_validate(to_dict(message))
    except ValidationError as exc:
        raise invalid_body(list(exc.errors())) from None


class _Call:
    """One RPC: its guard checks, its request context, its audit row and metrics."""

    __slots__ = (
        "_headers",
        "context",
        "guard",
        "ip",
        "key",
        "name",
        "request",
        "rid",
        "rule",
        "started",
        "status",
    )

    def __init__(self, name: str, rule: Rule | None, guard: Guard | None, context: Any) -> None:
        self.started = time.perf_counter()
        self.name, self.rule, self.guard, self.context = name, rule, guard, context
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        given = metadata.get("x-request-id")
        ok = isinstance(given, str) and _REQUEST_ID.match(given)
        self.rid: str = given if ok else uuid.uuid4().hex  # type: ignore[assignment]
        self.request = RequestContext(wants_text=bool(guard and guard.config.record_text))
        REQUEST.set(self.request)
        served.SERVED.set(served.Served())
        self.key: Any = None
        self.status = 200
        self.ip: str | None = peer_address(context.peer() or "")
        self._headers = {
            k.encode(): v.encode("latin-1", "replace")
            for k, v in metadata.items()
            if k in _WANTED and isinstance(v, str)
        }

    async def admit(self) -> None:
        """The guard's checks for the twin's rule (a refusal raises)."""
        guard = self.guard
        rule = self.rule or Rule(f"/{SERVICE}/{self.name}")  # its module is off
        if guard is not None:
            self.ip = guard.client_ip(self.ip, self._headers)
            self.key = await guard.admit(rule, self._headers, self.ip, self.request)
            await guard.limit(rule, self.key)
            self.request.key = self.key
        if self.rule is None:
            raise ApiError(501, "unimplemented", f"{self.name}: its module is not served here")

    def deadline(self) -> float | None:
        remaining = self.context.time_remaining()
        return None if remaining is None else max(0.0, remaining)

    def trailers(self) -> tuple[tuple[str, str], ...]:
        version = served.SERVED.get()
        out = [("x-request-id", self.rid)]
        if version is not None and version.version is not None:
            out.append(("x-dify-model-version", version.version))
        return tuple(out)

    async def fail(self, error: DifyError) -> None:
        """End the call with `error` as its status (raises grpc's abort)."""
        if isinstance(error, Refusal):
            REFUSALS.labels(error.code).inc()
        ERRORS.labels(error.code).inc()
        status = rpc_status_of(error, self.rid)
        trailers = status.trailing_metadata + self.trailers()[1:]
        await self.context.abort(status.code, status.details, trailing_metadata=trailers)

    async def finish(self, bytes_in: int, bytes_out: int) -> None:
        """The audit row, the token charge, the metrics."""
        request, rule, guard = self.request, self.rule, self.guard
        route = f"/{SERVICE}/{self.name}"
        model, _, version = (request.model or "").partition("@")
        REQUESTS.labels(route, "GRPC", str(self.status), model, version).inc()
        LATENCY.labels(route, "GRPC").observe(time.perf_counter() - self.started)
        if guard is None:
            return
        if self.key is not None and rule is not None and rule.generates:
            await guard.charge_tokens(self.key, int(request.completion_tokens or 0))
        entry = AuditEntry(
            time=time.time(),
            request_id=self.rid,
            key_id=self.key.id if self.key else request.key_id,
            client_ip=self.ip,
            method="GRPC",
            route=route,
            status=self.status,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            model=request.model,
            index=request.index,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            detail=request.audit_detail(),
        )
        guard.record(entry, request)


class DifyServicer(dify_pb2_grpc.DifyServiceServicer):
    """The RPCs; each translates its message and calls the data plane (see the module)."""

    def __init__(self, state: GatewayState, guard: Guard | None, routes: Iterable[Any]) -> None:
        self.state = state
        self.guard = guard
        declared = {(method, rule.template): rule for method, rule in rules_of(routes)}
        self.rules = {name: declared.get(twin) for name, twin in TWINS.items()}

    # ---- the two shapes of a call ------------------------------------------------------
    async def _unary(
        self,
        name: str,
        message: Message,
        context: Any,
        work: Callable[[_Call], Awaitable[R]],
    ) -> R:
        call = _Call(name, self.rules[name], self.guard, context)
        answer: R | None = None
        error: DifyError | None = None
        IN_FLIGHT.inc()
        try:
            try:
                await call.admit()
                async with asyncio.timeout(call.deadline()) as scope:
                    answer = await work(call)
            except DifyError as exc:
                error = exc
            except TimeoutError:
                if not scope.expired():
                    raise
                error = ApiError(504, "deadline_exceeded", f"{name}: the call's deadline passed")
        except Exception:
            log.exception("unhandled error in %s", name)
            error = ApiError(500, "internal_error", "internal error; see server logs")
        finally:
            IN_FLIGHT.dec()
            # neither: cancelled (the client left, or its deadline passed), work stopped
            call.status = error.status if error else 200 if answer is not None else 499
            await call.finish(message.ByteSize(), answer.ByteSize() if answer else 0)
        if error is not None:
            await call.fail(error)
        context.set_trailing_metadata(call.trailers())
        assert answer is not None
        return answer

    async def _stream(
        self,
        name: str,
        message: Message,
        context: Any,
        work: Callable[[_Call], AsyncIterator[R]],
    ) -> AsyncIterator[R]:
        call = _Call(name, self.rules[name], self.guard, context)
        sent = 0
        error: DifyError | None = None
        ended = False
        IN_FLIGHT.inc()
        try:
            try:
                await call.admit()
                async for item in work(call):
                    sent += item.ByteSize()
                    yield item
                ended = True
            except DifyError as exc:
                error = exc
        except Exception:
            log.exception("unhandled error in %s", name)
            error = ApiError(500, "internal_error", "internal error; see server logs")
        finally:
            IN_FLIGHT.dec()
            call.status = error.status if error else 200 if ended else 499
            await call.finish(message.ByteSize(), sent)
        if error is not None:
            await call.fail(error)
        context.set_trailing_metadata(call.trailers())

    # ---- inference ---------------------------------------------------------------------
    async def GenerateText(self, request: pb.TextRequest, context: Any) -> pb.TextResponse:
        async def work(call: _Call) -> pb.TextResponse:
            asked = body(InferenceRequest, request)
            if asked.stream:
                raise ApiError(422, "invalid_request", "stream: call GenerateTextStream")
            model = self.state.model(asked.model)
            answer = await inference.infer(self.state, model, asked, call.rid)
            return from_dict(pb.TextResponse, answer.model_dump())

        return await self._unary("GenerateText", request, context, work)

    async def GenerateTextStream(
        self, request: pb.TextRequest, context: Any
    ) -> AsyncIterator[pb.TextChunk]:
        async def work(call: _Call) -> AsyncIterator[pb.TextChunk]:
            asked = body(InferenceRequest, request)
            model = self.state.model(asked.model)
            if model.spec.task != Task.TEXT_GENERATION:
                raise ApiError(
                    422, "invalid_request", f"stream: {model.spec.task} models do not stream"
                )
            gen = inference.generation_from(model, asked)
            async for event in inference.deltas(self.state, model, gen, call.rid):
                yield from_dict(pb.TextChunk, event)

        # an async generator itself: grpc.aio iterates it on the call's own task
        async for chunk in self._stream("GenerateTextStream", request, context, work):
            yield chunk

    async def SubmitTask(self, request: pb.TaskRequest, context: Any) -> pb.Task:
        async def work(call: _Call) -> pb.Task:
            view = await tasks.submit_inference(self.state, body(AsyncInferenceRequest, request))
            return from_dict(pb.Task, view)

        return await self._unary("SubmitTask", request, context, work)

    async def GetTask(self, request: pb.GetTaskRequest, context: Any) -> pb.Task:
        async def work(call: _Call) -> pb.Task:
            if not _TASK_ID.match(request.task_id):
                raise ApiError(422, "invalid_request", "task_id: 1-64 letters, digits, - or _")
            task = await tasks.find(self.state, request.task_id)
            return from_dict(pb.Task, await tasks.view(self.state, task))

        return await self._unary("GetTask", request, context, work)

    # ---- data --------------------------------------------------------------------------
    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        async def work(call: _Call) -> pb.EmbedResponse:
            answer = await inference.embed_texts(self.state, body(EmbedRequest, request))
            return from_dict(pb.EmbedResponse, answer)

        return await self._unary("Embed", request, context, work)

    async def VectorSearch(self, request: pb.SearchRequest, context: Any) -> pb.SearchResponse:
        async def work(call: _Call) -> pb.SearchResponse:
            asked = body(SearchRequest, request)
            found = await data.search(self.state, asked.index, asked.model_dump(exclude={"index"}))
            return from_dict(pb.SearchResponse, found)

        return await self._unary("VectorSearch", request, context, work)

    async def Upsert(self, request: pb.UpsertRequest, context: Any) -> pb.UpsertResponse:
        async def work(call: _Call) -> pb.UpsertResponse:
            asked = body(UpsertRequest, request)
            as_task, answer = await data.upsert_or_submit(self.state, asked, request.ByteSize())
            if as_task:
                return pb.UpsertResponse(index=asked.index, task=from_dict(pb.Task, answer))
            return from_dict(pb.UpsertResponse, answer)

        return await self._unary("Upsert", request, context, work)

    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        async def work(call: _Call) -> pb.DeleteResponse:
            asked = body(DeleteRequest, request)
            audit = self.guard.audit if self.guard else None
            receipt = await data.erase(
                self.state, asked.index, asked.document_ids, asked.subject_id, audit
            )
            return from_dict(pb.DeleteResponse, receipt)

        return await self._unary("Delete", request, context, work)

    # ---- models ------------------------------------------------------------------------
    async def GetModelStatus(
        self, request: pb.ModelStatusRequest, context: Any
    ) -> pb.ModelStatusResponse:
        async def work(call: _Call) -> pb.ModelStatusResponse:
            found = await models.status(self.state)
            if request.HasField("name"):
                self.state.model(request.name)  # 404 (or 403) as REST names it
                found = [m for m in found if m.get("name") == request.name]
            return from_dict(pb.ModelStatusResponse, {"models": found})

        return await self._unary("GetModelStatus", request, context, work)
