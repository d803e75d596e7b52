"""Protobuf bodies on REST (`gateway/protobuf_body.py`), in-process with stand-in replicas.

The same request as JSON and as `application/x-protobuf` must get the same answer, and
be refused the same way: protobuf is a second wire format over one validation path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from google.protobuf.message import Message
from support import AUTH, index_doc, model_doc

from dify_serving.catalog.files import LocalStateStore
from dify_serving.engines.protocol import (
    Embeddings,
    EmbedRequest,
    Generation,
    GenerationDelta,
    GenerationRequest,
)
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.grpc import dify_pb2
from dify_serving.grpc.codec import from_dict, to_dict
from dify_serving.manifests import parse_documents
from dify_serving.options import GatewayOptions, LimitOptions, SecurityOptions, ServeOptions
from dify_serving.render import index_app_name, model_app_name

PROTOBUF = "application/x-protobuf"
BODY_LIMIT = 4096
MESSAGES: dict[str, tuple[type[Message], type[Message]]] = {
    "/v1/inference": (dify_pb2.TextRequest, dify_pb2.TextResponse),
    "/v1/data/embed": (dify_pb2.EmbedRequest, dify_pb2.EmbedResponse),
    "/v1/data/search": (dify_pb2.SearchRequest, dify_pb2.SearchResponse),
}
#: Fields that differ per request whatever the wire format.
PER_REQUEST = frozenset(("id", "took_ms"))


class _Stream:
    """A streaming Serve response: the prompt's words as deltas, the last one finished."""

    def __init__(self, words: list[str]) -> None:
        self.items = iter(
            [GenerationDelta(w) for w in words[:-1]]
            + [GenerationDelta(words[-1], "stop", len(words), len(words))]
        )

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> GenerationDelta:
        await asyncio.sleep(0)
        try:
            return next(self.items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        pass


class Llm:
    """A generation replica: the prompt in capitals, or streamed word by word."""

    def __init__(self) -> None:
        self.streaming = False

    def options(self, stream: bool = False, **_: Any) -> Llm:
        other = Llm()
        other.streaming = stream
        return other

    def __getattr__(self, method: str) -> Llm:
        return self

    def remote(self, request: GenerationRequest) -> Any:
        prompt = request.prompt or ""
        if self.streaming:
            return _Stream(prompt.split())
        return self._generate(prompt, request.max_tokens or 0)

    async def _generate(self, prompt: str, max_tokens: int) -> Generation:
        return Generation(prompt.upper(), "length", len(prompt.split()), max_tokens)


class Embedder:
    """An embedding replica: text i's vector is (len, 0.1, -1/3, i); 0.1 and 1/3 round in
    float32, so the vectors test that protobuf's floats carry what JSON carries."""

    def __getattr__(self, method: str) -> Embedder:
        return self

    def remote(self, requests: list[EmbedRequest]) -> Any:
        return self._embed(requests)

    async def _embed(self, requests: list[EmbedRequest]) -> list[Embeddings]:
        out = []
        for request in requests:
            rows = [[len(t), 0.1, -1 / 3, i] for i, t in enumerate(request.texts)]
            out.append(Embeddings(np.asarray(rows, dtype=np.float32), 3 * len(rows)))
        return out


class Index:
    """An index replica (`knowledge/deployment.py`): two hits, the query's words counted."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    def __getattr__(self, method: str) -> Index:
        return self

    def remote(self, request: dict[str, Any]) -> Any:
        self.asked.append(request)
        return self._search(request)

    async def _search(self, request: dict[str, Any]) -> dict[str, Any]:
        hit = {
            "document_id": "doc-1",
            "chunk_index": 0,
            "text": "the first chunk",
            "score": 0.8125,
            "metadata": {"lang": "en", "year": 2020, "tags": ["a", "b"], "ratio": 0.25},
            "subject_id": None,
            "start": 0,
            "end": 15,
        }
        second = {**hit, "chunk_index": 1, "score": 0.5, "subject_id": "s-1", "start": None}
        if request.get("query") == "misshapen":  # an answer the message cannot hold
            hit = {**hit, "chunk_index": 0.5}
        hits = [hit, second][: request.get("top_k", 10)]
        return {"hits": hits, "query_tokens": len((request.get("query") or "").split())}


@dataclass
class Gateway:
    http: TestClient
    index: Index

    def json(self, path: str, body: dict[str, Any], **headers: str) -> Any:
        return self.http.post(path, json=body, headers=headers)

    def protobuf(self, path: str, body: dict[str, Any] | bytes, **headers: str) -> Any:
        raw = body if isinstance(body, bytes) else encode(path, body)
        return self.http.post(path, content=raw, headers={"Content-Type": PROTOBUF, **headers})


def encode(path: str, body: dict[str, Any]) -> bytes:
    return from_dict(MESSAGES[path][0], body, strict=True).SerializeToString()


def decode(path: str, r: Any) -> dict[str, Any]:
    """The protobuf answer as the JSON answer it stands for."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == PROTOBUF
    assert int(r.headers["content-length"]) == len(r.content)
    return to_dict(MESSAGES[path][1].FromString(r.content))


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in PER_REQUEST}


def as_protobuf_reads_it(path: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A JSON answer as a protobuf reader sees it: proto3 cannot tell a zero or a null
    from an unset field, so those drop out; a key the message has no field for fails
    (`strict`), so an answer never loses a field on the way to protobuf unnoticed."""
    return to_dict(from_dict(MESSAGES[path][1], answer, strict=True))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A secured gateway with a generation model, an embedding model and an index, each
    behind a stand-in replica; request bodies over BODY_LIMIT bytes are refused. One for
    the module: the stand-ins keep no state a test relies on but `Index.asked`."""
    tmp_path = tmp_path_factory.mktemp("gateway")
    docs = [
        model_doc("llm", "builtin:demo-llm", "text-generation", generation={"maxNewTokens": 16}),
        model_doc("embed", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction"),
        index_doc("kb", "embed"),
    ]
    options = GatewayOptions(
        home=str(tmp_path),
        limits=LimitOptions(max_body_bytes=BODY_LIMIT),
        security=SecurityOptions(),
    )
    state = GatewayState(options)
    LocalStateStore(tmp_path).save(parse_documents(docs), ServeOptions(gateway=options))
    state.model_replicas._handles[model_app_name("llm")] = Llm()
    state.model_replicas._handles[model_app_name("embed")] = Embedder()
    index = Index()
    state.index_replicas._handles[index_app_name("kb")] = index
    app = create_app(state)
    try:
        yield Gateway(TestClient(app, headers=AUTH, raise_server_exceptions=False), index)
    finally:
        app.state.guard.close()


CASES = [
    ("/v1/inference", {"model": "llm", "prompt": "hello protobuf world", "max_tokens": 5}),
    ("/v1/inference", {"model": "embed", "input": ["one", "three"]}),
    ("/v1/data/embed", {"model": "embed", "input": ["a", "bb", "ccc"]}),
    ("/v1/data/search", {"index": "kb", "query": "first chunk", "top_k": 2}),
    (
        "/v1/data/search",
        {"index": "kb", "vector": [0.5, -0.25], "filter": {"lang": "en"}, "top_k": 1},
    ),
]


@pytest.mark.parametrize(
    ("path", "body"), CASES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(CASES)]
)
def test_the_same_request_gets_the_same_answer_in_either_format(
    gw: Gateway, path: str, body: dict[str, Any]
) -> None:
    plain = gw.json(path, body)
    assert plain.status_code == 200, plain.text
    expected = comparable(plain.json())
    read = comparable(as_protobuf_reads_it(path, plain.json()))

    json_out = gw.protobuf(path, body)  # protobuf in, JSON out (no Accept)
    assert json_out.status_code == 200, json_out.text
    assert json_out.headers["content-type"] == "application/json"
    assert comparable(json_out.json()) == expected

    proto_out = gw.protobuf(path, body, Accept=PROTOBUF)  # protobuf both ways
    assert comparable(decode(path, proto_out)) == read

    json_in = gw.json(path, body, Accept=PROTOBUF)  # JSON in, protobuf out
    assert comparable(decode(path, json_in)) == read


def test_the_replica_is_asked_the_same_either_way(gw: Gateway) -> None:
    body = {"index": "kb", "query": "q", "filter": {"year": {"gte": 2020}}, "score_threshold": 0.5}
    gw.index.asked.clear()
    gw.json("/v1/data/search", body)
    gw.protobuf("/v1/data/search", body)
    as_json, as_protobuf = gw.index.asked
    assert as_json == as_protobuf
    assert as_json["filter"] == {"year": {"gte": 2020}} and as_json["top_k"] == 10


def test_per_request_fields_are_carried_too(gw: Gateway) -> None:
    r = gw.json("/v1/inference", {"model": "llm", "prompt": "x"}, Accept=PROTOBUF)
    answer = decode("/v1/inference", r)
    assert answer["id"] == r.headers["x-request-id"]
    r = gw.json("/v1/data/search", {"index": "kb", "query": "x"}, Accept=PROTOBUF)
    assert decode("/v1/data/search", r)["index"] == "kb"


def test_content_type_parameters_and_case_are_accepted(gw: Gateway) -> None:
    body = encode("/v1/data/embed", {"model": "embed", "input": ["a"]})
    r = gw.http.post(
        "/v1/data/embed",
        content=body,
        headers={"Content-Type": "Application/X-Protobuf; messageType=difymirror.v1.EmbedRequest"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [[1.0, np.float32(0.1).item(), np.float32(-1 / 3).item(), 0.0]]


@pytest.mark.parametrize("path", list(MESSAGES))
def test_an_undecodable_body_is_400_malformed_protobuf_in_json(gw: Gateway, path: str) -> None:
    r = gw.protobuf(path, b"\xff\xff\xff\xff", Accept=PROTOBUF)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "malformed_protobuf"
    assert MESSAGES[path][0].DESCRIPTOR.full_name in error["message"]
    assert error["request_id"] == r.headers["x-request-id"]


def test_bad_utf8_in_a_string_field_is_malformed_protobuf(gw: Gateway) -> None:
    good = encode("/v1/inference", {"prompt": "ab"})  # field 2, length 2, "ab"
    r = gw.protobuf("/v1/inference", good[:-2] + b"\xff\xfe")
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_protobuf"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/inference", {"model": "llm", "prompt": "x", "temperature": 9.0}),
        ("/v1/inference", {"model": "llm", "prompt": "x", "max_tokens": 17}),
        ("/v1/data/embed", {"model": "embed"}),  # input is required
        ("/v1/data/search", {"index": "kb", "query": "x", "top_k": 0}),
        ("/v1/data/search", {"index": "kb"}),  # neither query nor vector
        ("/v1/inference", {"model": "nope", "prompt": "x"}),
    ],
)
def test_a_refused_request_is_refused_alike_and_answered_in_json(
    gw: Gateway, path: str, body: dict[str, Any]
) -> None:
    plain = gw.json(path, body)
    assert plain.status_code >= 400, plain.text
    for r in (gw.protobuf(path, body, Accept=PROTOBUF), gw.json(path, body, Accept=PROTOBUF)):
        assert r.status_code == plain.status_code, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == plain.json()["error"]["code"]
        assert r.json()["error"]["message"] == plain.json()["error"]["message"]


def test_temperature_out_of_bounds_is_422_with_the_json_message(gw: Gateway) -> None:
    r = gw.protobuf("/v1/inference", {"model": "llm", "prompt": "x", "temperature": 9.0})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["message"].startswith("temperature:")


def test_an_oversized_protobuf_body_is_413_before_it_is_parsed(gw: Gateway) -> None:
    body = encode("/v1/inference", {"model": "llm", "prompt": "w " * BODY_LIMIT})
    assert len(body) > BODY_LIMIT
    r = gw.protobuf("/v1/inference", body, Accept=PROTOBUF)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    # the bytes are what count, not the JSON they would become (that is longer)
    search = {"index": "kb", "vector": [0.1] * 1000}
    within = encode("/v1/data/search", search)
    as_json = to_dict(dify_pb2.SearchRequest.FromString(within))
    assert len(within) <= BODY_LIMIT < len(json.dumps(as_json))
    assert gw.protobuf("/v1/data/search", within).status_code == 200


def test_an_answer_the_message_cannot_hold_is_a_json_500_not_a_lossy_message(
    gw: Gateway,
) -> None:
    body = {"index": "kb", "query": "misshapen"}
    assert gw.json("/v1/data/search", body).json()["hits"][0]["chunk_index"] == 0.5
    r = gw.json("/v1/data/search", body, Accept=PROTOBUF)
    assert r.status_code == 500, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "internal_error"


def test_a_stream_request_in_protobuf_answers_server_sent_events(gw: Gateway) -> None:
    body = {"model": "llm", "prompt": "one two three", "stream": True}
    with gw.http.stream(
        "POST",
        "/v1/inference",
        content=encode("/v1/inference", body),
        headers={"Content-Type": PROTOBUF, "Accept": f"text/event-stream, {PROTOBUF}"},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert [e["delta"] for e in events] == ["one", "two", "three"]
    assert events[-1]["finish_reason"] == "stop"


def test_other_routes_are_left_alone(gw: Gateway) -> None:
    r = gw.http.get("/v1/models", headers={"Accept": PROTOBUF})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = encode("/v1/inference", {"model": "llm", "prompt": "x"})
    r = gw.protobuf("/v1/inference/batch", body)  # no protobuf here: FastAPI's 422
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
