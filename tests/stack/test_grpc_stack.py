"""DifyService on the real stack: the gateway replica serves gRPC beside HTTP.

Real engines on Ray Serve behind it, a real grpcio client in front; the answers agree
with the REST API's. The guard, the error mapping, deadlines and cancellation are
exercised in `tests/unit/test_grpc.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import AUTH

from dify_serving.grpc import dify_pb2 as pb
from dify_serving.grpc import dify_pb2_grpc
from dify_serving.local import LocalStack

METADATA = (("authorization", AUTH["Authorization"]),)


@pytest.fixture(scope="module")
def channel(stack: LocalStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{stack.settings.grpc_port}") as opened:
        grpc.channel_ready_future(opened).result(timeout=60)
        yield opened


def test_the_gateway_serves_health_and_generates(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    checked = health.Check(health_pb2.HealthCheckRequest(service="difymirror.v1.DifyService"))
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    stub = dify_pb2_grpc.DifyServiceStub(channel)
    request = pb.TextRequest(model="demo-llm", prompt="Once upon", max_tokens=8, temperature=0)
    whole = stub.GenerateText(request, metadata=METADATA, timeout=120)
    assert whole.model == "demo-llm" and whole.output.string_value
    assert whole.usage.completion_tokens > 0
    chunks = list(stub.GenerateTextStream(request, metadata=METADATA, timeout=120))
    assert len(chunks) > 1 and chunks[-1].finish_reason
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert "".join(c.delta for c in chunks) == whole.output.string_value  # greedy: the same text


def test_embeddings_and_search_agree_with_rest(channel: grpc.Channel, client: httpx.Client) -> None:
    stub = dify_pb2_grpc.DifyServiceStub(channel)
    texts = ["a refund within thirty days", "shipping to Norway"]
    embedded = stub.Embed(pb.EmbedRequest(model="minilm", input=texts), metadata=METADATA)
    rest = client.post("/v1/data/embed", json={"model": "minilm", "input": texts}).json()
    assert embedded.dimension == rest["dimension"] == 384
    for mine, theirs in zip(embedded.data, rest["data"], strict=True):
        assert list(mine.values) == pytest.approx(theirs, abs=1e-6)
    query = {"index": "kb", "query": "refunds", "top_k": 3}
    found = stub.VectorSearch(pb.SearchRequest(**query), metadata=METADATA)
    rest = client.post("/v1/data/search", json=query).json()
    assert [(h.document_id, h.chunk_index) for h in found.hits] == [
        (h["document_id"], h["chunk_index"]) for h in rest["hits"]
    ]
    status = stub.GetModelStatus(pb.ModelStatusRequest(name="minilm"), metadata=METADATA)
    assert [(m.name, m.phase) for m in status.models] == [("minilm", "Ready")]
