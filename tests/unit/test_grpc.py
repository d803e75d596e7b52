"""DifyService over a real gRPC port, with a real grpcio client over the network.

The gateway is in-process (no Ray): its gRPC server runs on an event loop of its own
thread, exactly as a replica runs it, and stand-in replica handles answer as the
engines' contracts say. What is checked: unary and streamed answers (chunks arrive while
the model still generates; cancelling the call stops it), the client's deadline,
reflection (a client that has no .proto discovers and calls the service), health, every
status the mapping gives with its rich details, and the guard: no key, wrong scope,
a second factor, rate limits, a spoofed forwarded address, one audit row per call, TLS.
The same RPCs against real engines on Ray Serve are in `tests/stack/test_grpc_stack.py`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyotp
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from standins import Embedder, Index, Llm, install
from support import API_KEY, free_port, index_doc, model_doc, wait_for

from dify_serving.catalog.files import LocalStateStore
from dify_serving.gateway.app import create_app
from dify_serving.gateway.rpc.server import start_grpc
from dify_serving.gateway.state import GatewayState
from dify_serving.grpc import dify_pb2 as pb
from dify_serving.grpc import dify_pb2_grpc
from dify_serving.manifests import parse_documents
from dify_serving.options import GatewayOptions, SecurityOptions, ServeOptions

ADMIN = (("authorization", f"Bearer {API_KEY}"),)
SERVICE = "difymirror.v1.DifyService"


# ---- the gateway ------------------------------------------------------------------------
class Rpc:
    """An in-process gateway's gRPC port, served from its own thread's event loop."""

    def __init__(self, home: Path, tls: tuple[str, str] | None = None, **security: Any) -> None:
        docs = [
            model_doc(
                "llm", "builtin:demo-llm", "text-generation", generation={"maxNewTokens": 16}
            ),
            model_doc("cold", "builtin:demo-llm", "text-generation"),
            model_doc("embed", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction"),
            index_doc("kb", "embed"),
        ]
        options = GatewayOptions(home=str(home), security=SecurityOptions(**security))
        LocalStateStore(home).save(parse_documents(docs), ServeOptions(gateway=options))
        self.llm, self.index = Llm(), Index()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()

        async def build() -> tuple[GatewayState, Any, Any]:
            state = GatewayState(options)
            install(state, {"llm": self.llm, "embed": Embedder()}, {"kb": self.index})
            cold = {"name": "cold", "phase": "Loading", "message": "loading weights"}
            state.status.models["cold"] = cold
            ready = {"name": "llm", "phase": "Ready", "ready_replicas": 1, "desired_replicas": 1}
            state.status.models["llm"] = ready
            app = create_app(state)
            guard = getattr(app.state, "guard", None)
            server = await start_grpc(state, guard, app.routes, "127.0.0.1", self.port, tls)
            return state, app, server

        self.state, self.app, self.server = self.run(build())
        self.guard = getattr(self.app.state, "guard", None)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}") if tls is None else None
        if self.channel is not None:
            self.stub = dify_pb2_grpc.DifyServiceStub(self.channel)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.run(self.server.stop())
        if self.guard is not None:
            self.guard.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def key(self, scopes: list[str], **options: Any) -> tuple[tuple[str, str], ...]:
        created = self.guard.keys.create("t", scopes, **options)  # type: ignore[union-attr]
        self.last_key = created
        return (("authorization", f"Bearer {created.key}"),)

    def audit(self) -> list[dict[str, Any]]:
        assert self.guard is not None
        self.guard.refusals.flush()
        self.guard.audit.flush()
        rows: list[dict[str, Any]] = self.guard.audit.query(limit=1000)[0]
        return [r for r in rows if r["method"] == "GRPC"]


@pytest.fixture()
def rpc(tmp_path: Path) -> Iterator[Rpc]:
    gateway = Rpc(tmp_path)
    try:
        yield gateway
    finally:
        gateway.close()


def _error(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, Any]]:
    """The code, the message and the rich details (ErrorInfo, RetryInfo) of a failed call."""
    details: dict[str, Any] = {}
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for packed in status.details if status else []:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                details[kind.__name__] = message
    return exc.code(), exc.details() or "", details


# ---- answers ----------------------------------------------------------------------------
def test_generate_text_answers_with_the_request_id_and_one_audit_row(rpc: Rpc) -> None:
    answer, call = rpc.stub.GenerateText.with_call(
        pb.TextRequest(model="llm", prompt="hi there", max_tokens=4),
        metadata=(*ADMIN, ("x-request-id", "req-42")),
    )
    assert answer.model == "llm" and answer.id == "req-42"
    assert answer.output.string_value == "HI THERE"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (3, 4)
    assert answer.finish_reason == "length"
    assert ("x-request-id", "req-42") in tuple(call.trailing_metadata())
    [row] = rpc.audit()
    assert row["route"] == f"/{SERVICE}/GenerateText" and row["status"] == 200
    assert (row["model"], row["prompt_tokens"], row["completion_tokens"]) == ("llm", 3, 4)
    assert row["request_id"] == "req-42" and row["client_ip"] == "127.0.0.1"


def test_chunks_arrive_before_the_generation_ends(rpc: Rpc) -> None:
    stream = rpc.stub.GenerateTextStream(pb.TextRequest(model="llm", prompt="x"), metadata=ADMIN)
    first = next(stream)
    assert first.delta == "Hello" and not first.HasField("finish_reason")
    assert not rpc.llm.release.is_set()  # the model is still generating
    rpc.llm.release.set()
    last = next(stream)
    assert (last.delta, last.finish_reason, last.index) == (" world", "stop", 1)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 2)
    assert list(stream) == []
    assert not rpc.llm.cancelled.is_set()
    assert wait_for(lambda: len(rpc.audit()) == 1)
    assert rpc.audit()[0]["completion_tokens"] == 2


def test_cancelling_a_stream_stops_the_generation(rpc: Rpc) -> None:
    stream = rpc.stub.GenerateTextStream(pb.TextRequest(model="llm", prompt="x"), metadata=ADMIN)
    assert next(stream).delta == "Hello"
    stream.cancel()
    assert wait_for(rpc.llm.cancelled.is_set), "the model kept generating"
    assert wait_for(lambda: [r["status"] for r in rpc.audit()] == [499])


def test_the_clients_deadline_ends_the_call_and_its_generation(rpc: Rpc) -> None:
    rpc.llm.slow = True
    with pytest.raises(grpc.RpcError) as raised:
        rpc.stub.GenerateText(pb.TextRequest(model="llm", prompt="x"), metadata=ADMIN, timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(rpc.llm.cancelled.is_set), "the generation outlived its deadline"
    assert wait_for(lambda: [r["status"] for r in rpc.audit()] in ([504], [499]))


def test_embed_search_upsert_tasks_and_status(rpc: Rpc) -> None:
    embedded = rpc.stub.Embed(pb.EmbedRequest(model="embed", input=["ab", "abc"]), metadata=ADMIN)
    assert embedded.dimension == 3 and len(embedded.data) == 2
    assert list(embedded.data[1].values) == pytest.approx([0.1, -1 / 3, 3.0], rel=1e-6)
    found = rpc.stub.VectorSearch(
        pb.SearchRequest(index="kb", query="refunds", top_k=3), metadata=ADMIN
    )
    [hit] = found.hits
    assert (hit.document_id, hit.end, hit.metadata["year"]) == ("d1", 22, 2024)
    assert found.index == "kb" and found.query_tokens == 4
    stored = rpc.stub.Upsert(
        pb.UpsertRequest(index="kb", documents=[pb.Document(id="a", text="some text")]),
        metadata=ADMIN,
    )
    assert [d.id for d in stored.documents] == ["a"] and not stored.HasField("task")
    status = rpc.stub.GetModelStatus(pb.ModelStatusRequest(name="llm"), metadata=ADMIN)
    assert [m.name for m in status.models] == ["llm"] and status.models[0].task
    with pytest.raises(grpc.RpcError) as raised:
        rpc.stub.GetTask(pb.GetTaskRequest(task_id="no-such-task"), metadata=ADMIN)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(rpc.audit()) == 5


# ---- discovery and health -------------------------------------------------------------
def test_a_client_without_the_proto_finds_and_calls_the_service_by_reflection(
    rpc: Rpc,
) -> None:
    database = ProtoReflectionDescriptorDatabase(rpc.channel)
    services = set(database.get_services())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(database)  # not the pool dify_pb2 filled
    service = pool.FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} >= {"GenerateText", "VectorSearch", "Embed"}
    method = service.FindMethodByName("GenerateText")
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    assert request_type is not pb.TextRequest
    call = rpc.channel.unary_unary(
        f"/{SERVICE}/GenerateText",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    request = request_type()
    request.model, request.prompt = "llm", "found"
    assert call(request, metadata=ADMIN).output.string_value == "FOUND"


def _readme_grpcurl() -> list[str]:
    """The README's grpcurl command, its continuation lines joined."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    found = re.search(r"^grpcurl .*?(?<!\\)$", readme, re.MULTILINE | re.DOTALL)
    assert found, "the README has no grpcurl line"
    return shlex.split(found.group(0).replace("\\\n", " "))


def test_the_readmes_grpcurl_line_works_by_reflection_alone(rpc: Rpc) -> None:
    """The real grpcurl (no .proto given) lists the service and runs the README's call."""
    grpcurl = Path(sys.executable).with_name("grpcurl")
    if not grpcurl.exists():
        pytest.fail("grpcurl is missing: make install puts it in the venv")
    target = f"127.0.0.1:{rpc.port}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(grpcurl), *args], capture_output=True, text=True, timeout=60)

    listed = run("-plaintext", target, "list")
    assert SERVICE in listed.stdout.split(), listed.stderr
    described = run("-plaintext", target, "describe", SERVICE)
    assert "GenerateText ( .difymirror.v1.TextRequest )" in described.stdout, described.stderr
    method = run("-plaintext", target, "describe", f"{SERVICE}.GenerateText")
    assert "returns ( .difymirror.v1.TextResponse )" in method.stdout, method.stderr
    command = _readme_grpcurl()
    assert command[0] == "grpcurl" and command[-2] == "127.0.0.1:9000"
    args = [a.replace("$KEY", API_KEY) for a in command[1:-2]]
    args[args.index("-d") + 1] = args[args.index("-d") + 1].replace('"demo-llm"', '"llm"')
    answered = run(*args, target, command[-1])
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["output"] == "HELLO"
    keyless = [a for a in args if not a.startswith(("-H", "authorization:"))]
    refused = run(*keyless, target, command[-1])
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def test_health_says_serving_for_the_server_and_the_service(rpc: Rpc) -> None:
    health = health_pb2_grpc.HealthStub(rpc.channel)
    for name in ("", SERVICE):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    rpc.run(rpc.server.health.enter_graceful_shutdown())
    answer = health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING


# ---- errors, each from the one mapping ------------------------------------------------
def test_every_error_has_its_code_and_details(rpc: Rpc) -> None:
    text = pb.TextRequest(model="llm", prompt="x")
    cases = [
        ((), grpc.StatusCode.UNAUTHENTICATED, "unauthorized"),
        (rpc.key(["data:read"]), grpc.StatusCode.PERMISSION_DENIED, "forbidden"),
    ]
    for metadata, code, reason in cases:
        with pytest.raises(grpc.RpcError) as raised:
            rpc.stub.GenerateText(text, metadata=metadata)
        got, message, details = _error(raised.value)
        assert (got, details["ErrorInfo"].reason) == (code, reason), message
        assert details["ErrorInfo"].domain == "difymirror.dev"
    codes = grpc.StatusCode
    for request, code, reason, needle in [
        (pb.TextRequest(model="nope", prompt="x"), codes.NOT_FOUND, "model_not_found", "nope"),
        (
            pb.TextRequest(model="llm", prompt="x", temperature=9),
            codes.INVALID_ARGUMENT,
            "invalid_request",
            "temperature",
        ),
        (
            pb.TextRequest(model="llm", prompt="x", max_tokens=99),
            codes.INVALID_ARGUMENT,
            "invalid_request",
            "max_tokens",
        ),
        (pb.TextRequest(model="cold", prompt="x"), codes.UNAVAILABLE, "model_not_ready", "loading"),
    ]:
        with pytest.raises(grpc.RpcError) as raised:
            rpc.stub.GenerateText(request, metadata=ADMIN)
        got, message, details = _error(raised.value)
        assert (got, details["ErrorInfo"].reason) == (code, reason), message
        assert needle in message
        assert details["ErrorInfo"].metadata["request_id"]
        if code == grpc.StatusCode.UNAVAILABLE:
            assert details["RetryInfo"].retry_delay.seconds >= 1
    rows = rpc.audit()
    assert len(rows) == 6 and {r["status"] for r in rows} == {401, 403, 404, 422, 503}


def test_a_key_over_its_limit_gets_resource_exhausted_with_retry_info(rpc: Rpc) -> None:
    metadata = rpc.key(["inference"], rate_limit={"requests_per_minute": 1})
    rpc.stub.GenerateText(pb.TextRequest(model="llm", prompt="x"), metadata=metadata)
    with pytest.raises(grpc.RpcError) as raised:
        rpc.stub.GenerateText(pb.TextRequest(model="llm", prompt="x"), metadata=metadata)
    code, message, details = _error(raised.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 requests per minute" in message
    assert details["RetryInfo"].retry_delay.seconds >= 1
    assert details["ErrorInfo"].reason == "rate_limited"


def test_a_sensitive_call_needs_the_second_factor_in_metadata(rpc: Rpc) -> None:
    metadata = rpc.key(["data:write"], totp=True)
    erase = pb.DeleteRequest(index="kb", document_ids=["a"])
    with pytest.raises(grpc.RpcError) as raised:
        rpc.stub.Delete(erase, metadata=metadata)
    code, _, details = _error(raised.value)
    assert (code, details["ErrorInfo"].reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "second_factor_required",
    )
    assert rpc.index.deleted == []
    code_now = pyotp.TOTP(rpc.last_key.totp_secret).now()
    receipt = rpc.stub.Delete(erase, metadata=(*metadata, ("x-dify-otp", code_now)))
    assert receipt.points_removed == 3 and list(receipt.document_ids) == ["a"]
    assert rpc.index.deleted == [(["a"], None)]


def test_a_forwarded_address_counts_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    spoof = ("x-forwarded-for", "10.1.2.3")
    for trusted, allowed in (([], False), (["127.0.0.1/32"], True)):
        home = tmp_path / str(allowed)
        home.mkdir()
        gateway = Rpc(home, trusted_proxies=trusted)
        try:
            metadata = (*gateway.key(["inference"], ip_allowlist=["10.0.0.0/8"]), spoof)
            request = pb.TextRequest(model="llm", prompt="x")
            if allowed:
                assert gateway.stub.GenerateText(request, metadata=metadata).output.string_value
            else:
                with pytest.raises(grpc.RpcError) as raised:
                    gateway.stub.GenerateText(request, metadata=metadata)
                assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            [row] = gateway.audit()
            assert row["client_ip"] == ("10.1.2.3" if allowed else "127.0.0.1")
        finally:
            gateway.close()


# ---- TLS --------------------------------------------------------------------------------
def test_tls_takes_the_https_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    gateway = Rpc(home, tls=(str(cert), str(key)))
    try:
        target = f"127.0.0.1:{gateway.port}"
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(target, credentials) as channel:
            stub = dify_pb2_grpc.DifyServiceStub(channel)
            answer = stub.GenerateText(pb.TextRequest(model="llm", prompt="tls"), metadata=ADMIN)
            assert answer.output.string_value == "TLS"
        with grpc.insecure_channel(target) as plain:  # a plaintext client is not served
            with pytest.raises(grpc.RpcError) as raised:
                dify_pb2_grpc.DifyServiceStub(plain).GenerateText(
                    pb.TextRequest(model="llm", prompt="x"), metadata=ADMIN, timeout=5
                )
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.close()
