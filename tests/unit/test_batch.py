"""`POST /v1/inference/batch` in-process, with stand-in replica handles (no Ray).

The stand-ins answer as the engines' contracts say (`Generation`, `Embeddings` or an
`EngineError` per request); the real engines, the coalescer over Serve and the outputs
against `/v1/inference` are in `tests/stack/test_batch.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from gateways import audit_rows
from support import AUTH, model_doc

from dify_serving.catalog.files import LocalStateStore
from dify_serving.engines.protocol import (
    Embeddings,
    EmbedRequest,
    Generation,
    GenerationRequest,
    InputTooLong,
)
from dify_serving.gateway.app import create_app
from dify_serving.gateway.dataplane import inference as plane
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.schemas import MAX_BATCH_REQUESTS
from dify_serving.gateway.state import GatewayState
from dify_serving.manifests import parse_documents
from dify_serving.options import GatewayOptions, LimitOptions, SecurityOptions, ServeOptions
from dify_serving.render import model_app_name

MAX_NEW = 16
LIMIT = 16


class Llm:
    """A generation replica: answers a prompt in capitals, the later ones sooner (so
    the order of the answers is not the order of the items), and counts calls at once."""

    def __init__(self) -> None:
        self.running = self.most = 0

    def __getattr__(self, method: str) -> Llm:
        return self

    def remote(self, request: GenerationRequest) -> Any:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> Generation:
        self.running += 1
        self.most = max(self.most, self.running)
        prompt = request.prompt or ""
        for _ in range(max(1, 40 - len(prompt))):  # longer prompts answer sooner
            await asyncio.sleep(0)
        self.running -= 1
        return Generation(
            text=prompt.upper(),
            finish_reason="length",
            prompt_tokens=len(prompt.split()),
            completion_tokens=request.max_tokens or 0,
        )


class Embedder:
    """An embedding replica: a text's vector is its length four times; "too long" is."""

    def __init__(self) -> None:
        self.calls: list[list[EmbedRequest]] = []

    def __getattr__(self, method: str) -> Embedder:
        return self

    def remote(self, requests: list[EmbedRequest]) -> Any:
        self.calls.append(requests)
        return self._embed(requests)

    async def _embed(self, requests: list[EmbedRequest]) -> list[Embeddings | InputTooLong]:
        await asyncio.sleep(0)
        out: list[Embeddings | InputTooLong] = []
        for request in requests:
            if "too long" in request.texts:
                out.append(InputTooLong("input: over the model's 256 tokens"))
            else:
                rows = [[float(len(t))] * 4 for t in request.texts]
                out.append(Embeddings(np.asarray(rows, dtype=np.float32), 2 * len(rows)))
        return out


@dataclass
class Batching:
    http: TestClient
    state: GatewayState
    llm: Llm
    small: Llm
    embedder: Embedder

    def post(self, body: dict[str, Any]) -> Any:
        return self.http.post("/v1/inference/batch", json=body)


@pytest.fixture()
def gw(tmp_path: Path) -> Iterator[Batching]:
    """A secured gateway with a generation model, an embedding model and a generation
    model of 2 slots, each behind a stand-in replica; at most LIMIT items a batch."""
    generation = {"maxNewTokens": MAX_NEW}
    small = model_doc("small", "builtin:demo-llm", "text-generation", generation=generation)
    small["spec"]["batching"] = {"maxConcurrentRequests": 2}
    docs = [
        model_doc("llm", "builtin:demo-llm", "text-generation", generation=generation),
        model_doc("embed", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction"),
        small,
    ]
    options = GatewayOptions(
        home=str(tmp_path),
        limits=LimitOptions(max_batch_requests=LIMIT),
        security=SecurityOptions(),
    )
    state = GatewayState(options)
    LocalStateStore(tmp_path).save(parse_documents(docs), ServeOptions(gateway=options))
    stand_ins = Batching(None, state, Llm(), Llm(), Embedder())  # type: ignore[arg-type]
    handles = state.model_replicas._handles
    handles[model_app_name("llm")] = stand_ins.llm
    handles[model_app_name("small")] = stand_ins.small
    handles[model_app_name("embed")] = stand_ins.embedder
    app = create_app(state)
    stand_ins.http = TestClient(app, headers=AUTH, raise_server_exceptions=False)
    try:
        yield stand_ins
    finally:
        app.state.guard.close()


def _error(r: Any, status: int, code: str, *needles: str) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    for needle in needles:
        assert needle in error["message"], error["message"]
    return str(error["message"])


def test_results_come_in_the_items_order_and_the_items_run_together(gw: Batching) -> None:
    prompts = [f"p{i} " + "w " * i for i in range(12)]  # later items answer first
    r = gw.post({"model": "llm", "requests": [{"prompt": p, "max_tokens": 3} for p in prompts]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "llm" and body["id"] == r.headers["x-request-id"]
    assert [x["index"] for x in body["results"]] == list(range(12))
    assert [x["output"] for x in body["results"]] == [p.upper() for p in prompts]
    assert all(x["status"] == "ok" and x["finish_reason"] == "length" for x in body["results"])
    assert gw.llm.most == 12, "the items should reach the model together"
    words = sum(len(p.split()) for p in prompts)
    assert body["usage"] == {
        "prompt_tokens": words,
        "completion_tokens": 36,
        "total_tokens": words + 36,
    }


def test_one_bad_item_fails_alone_with_the_error_inference_gives_it(gw: Batching) -> None:
    bad: list[dict[str, Any]] = [{"input": "no prompt"}, {"prompt": "x", "max_tokens": MAX_NEW + 1}]
    items = [{"prompt": "first"}, *bad, {"prompt": "last"}]
    r = gw.post({"model": "llm", "requests": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["ok", "error", "error", "ok"]
    assert [results[0]["output"], results[3]["output"]] == ["FIRST", "LAST"]
    assert set(results[1]) == {"index", "status", "error"}
    for item, result in zip(bad, results[1:3], strict=True):
        alone = gw.http.post("/v1/inference", json={"model": "llm", **item})
        assert alone.status_code == 422, alone.text
        expected = alone.json()["error"]
        assert result["error"] == {"code": expected["code"], "message": expected["message"]}
    assert "prompt: required" in results[1]["error"]["message"]
    assert f"over the limit of model 'llm' ({MAX_NEW})" in results[2]["error"]["message"]
    assert r.json()["usage"]["completion_tokens"] == 2 * MAX_NEW  # the two that ran


def test_embeddings_items_and_an_input_too_long(gw: Batching) -> None:
    items = [{"input": ["a", "bbb"]}, {"input": "too long"}, {"input": "cc"}]
    r = gw.post({"model": "embed", "requests": items})
    assert r.status_code == 200, r.text
    ok, failed, single = r.json()["results"]
    assert ok["output"] == [[1.0] * 4, [3.0] * 4] and single["output"] == [2.0] * 4
    assert failed["error"]["code"] == "input_too_long"
    assert r.json()["usage"]["prompt_tokens"] == 6
    assert sum(len(rq.texts) for call in gw.embedder.calls for rq in call) == 4


def test_an_unexpected_error_is_internal_without_its_text(
    gw: Batching, monkeypatch: pytest.MonkeyPatch
) -> None:
    infer = plane.infer

    async def failing(state: Any, model: Any, body: Any, rid: str) -> Any:
        if body.prompt == "boom":
            raise RuntimeError("secret at /srv/weights/x")
        return await infer(state, model, body, rid)

    monkeypatch.setattr(plane, "infer", failing)
    r = gw.post({"requests": [{"prompt": "boom"}, {"prompt": "fine"}]})
    assert r.status_code == 200, r.text
    failed, ok = r.json()["results"]
    assert failed["error"] == {
        "code": "internal_error",
        "message": "internal error; see server logs",
    }
    assert ok["output"] == "FINE" and "secret" not in r.text


def test_the_model_unavailable_for_every_item_fails_the_request(
    gw: Batching, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = ApiError(503, "model_unavailable", "model 'llm' is unavailable; retry shortly")
    infer = plane.infer

    async def unavailable(state: Any, model: Any, body: Any, rid: str) -> Any:
        if body.prompt == "ok":
            return await infer(state, model, body, rid)
        raise gone

    monkeypatch.setattr(plane, "infer", unavailable)
    r = gw.post({"model": "llm", "requests": [{"prompt": "a"}, {"prompt": "b"}]})
    _error(r, 503, "model_unavailable", "retry shortly")
    assert r.headers["retry-after"] == "1"
    mixed = gw.post({"model": "llm", "requests": [{"prompt": "a"}, {"prompt": "ok"}]})
    assert [x["status"] for x in mixed.json()["results"]] == ["error", "ok"]


def test_a_model_that_is_not_serving_fails_the_request(gw: Batching) -> None:
    gw.state.status.models["llm"] = {"phase": "Failed", "message": "no weights"}
    r = gw.post({"model": "llm", "requests": [{"prompt": "a"}]})
    _error(r, 503, "model_failed", "no weights")
    _error(gw.post({"model": "nope", "requests": [{"prompt": "a"}]}), 404, "model_not_found")


def test_a_batch_larger_than_the_models_slots_waits_rather_than_overloads(
    gw: Batching,
) -> None:
    """`small` has 2 slots (and an in-flight bound of 10): 16 items run 2 at a time."""
    r = gw.post({"model": "small", "requests": [{"prompt": f"x{i}"} for i in range(LIMIT)]})
    assert r.status_code == 200, r.text
    assert all(x["status"] == "ok" for x in r.json()["results"])
    assert gw.small.most == 2


def test_over_the_limit_is_413_naming_it(gw: Batching) -> None:
    items = [{"prompt": "x"}] * (LIMIT + 1)
    _error(
        gw.post({"model": "llm", "requests": items}),
        413,
        "payload_too_large",
        f"{LIMIT + 1} in one batch",
        f"the limit is {LIMIT}",
        "DIFY_MIRROR_MAX_BATCH_REQUESTS",
    )
    huge = [{"prompt": "x", "temperature": "not a number"}] * (MAX_BATCH_REQUESTS + 1)
    _error(  # refused by its length alone, before any item is looked at
        gw.post({"requests": huge}),
        413,
        "payload_too_large",
        f"requests: {MAX_BATCH_REQUESTS + 1} requests; the limit is {MAX_BATCH_REQUESTS}",
    )


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"requests": []}, ("requests", "at least 1")),
        ({"model": "llm"}, ("requests", "required")),
        (
            {"requests": [{"prompt": "a"}, {"prompt": "b", "stream": True}]},
            ("requests.1.stream", "does not stream"),
        ),
        (
            {"model": "llm", "requests": [{"prompt": "a"}, {"model": "embed", "input": "b"}]},
            ("item 1 names model 'embed', the batch 'llm'", "one batch is one model"),
        ),
        (
            {"requests": [{"model": "llm", "prompt": "a"}, {"model": "small", "prompt": "b"}]},
            ("item 1 names model 'small', the batch 'llm'",),
        ),
        ({"requests": [{"prompt": "a"}], "async_": True}, ("async_", "Extra inputs")),
    ],
)
def test_malformed_batches_are_422(gw: Batching, body: dict[str, Any], needles: Any) -> None:
    _error(gw.post(body), 422, "invalid_request", *needles)
    assert gw.llm.most == 0


def test_items_may_name_the_batchs_model(gw: Batching) -> None:
    r = gw.post({"requests": [{"model": "embed", "input": "a"}, {"input": "bb"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "embed"
    assert [x["output"] for x in r.json()["results"]] == [[1.0] * 4, [2.0] * 4]


def test_the_audit_row_carries_the_batchs_token_totals(gw: Batching) -> None:
    items = [{"prompt": "one two", "max_tokens": 3}, {"prompt": "three", "max_tokens": 5}]
    r = gw.post({"model": "llm", "requests": [*items, {"input": "no prompt"}]})
    assert r.status_code == 200, r.text
    [row] = [x for x in audit_rows(gw.http) if x["route"] == "/v1/inference/batch"]
    assert (row["model"], row["prompt_tokens"], row["completion_tokens"]) == ("llm", 3, 8)
    assert row["detail"] == "batch of 3, 1 failed"
