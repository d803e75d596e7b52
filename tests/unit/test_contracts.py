"""The typed data plane's contracts: capabilities, the engine registry, the one error type."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dify_serving.catalog import Unreachable
from dify_serving.engines import protocol
from dify_serving.engines.protocol import (
    Embedder,
    Embeddings,
    EmbedRequest,
    EngineError,
    Generation,
    GenerationDelta,
    GenerationRequest,
    Generator,
    InputTooLong,
    PredictionRequest,
    Predictor,
    capability_methods,
)
from dify_serving.engines.registry import ENGINES, engine_class
from dify_serving.errors import DifyError
from dify_serving.gateway.app import create_app
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.state import GatewayState
from dify_serving.knowledge.errors import DimensionMismatch, InvalidFilter
from dify_serving.options import GatewayOptions, SecurityOptions
from dify_serving.specs import Task

CAPABILITY = {
    Task.TEXT_GENERATION: Generator,
    Task.FEATURE_EXTRACTION: Embedder,
    Task.TEXT_CLASSIFICATION: Predictor,
    Task.IMAGE_CLASSIFICATION: Predictor,
    Task.IMAGE_TO_TEXT: Predictor,
}


def test_every_task_has_an_engine_with_its_capability() -> None:
    """The registry covers every task, and each engine implements its task's Protocol
    (imported by path: nothing is loaded, no weights are read)."""
    assert set(ENGINES) == set(Task)
    for task, capability in CAPABILITY.items():
        cls = engine_class(task)
        assert issubclass(cls, capability), (task, cls)
        others = {Generator, Embedder, Predictor} - {capability}
        assert not any(issubclass(cls, other) for other in others), (task, cls)


def test_a_replica_exposes_the_methods_of_its_capabilities_only() -> None:
    class Both:
        async def generate(self, request: GenerationRequest) -> Generation:
            return Generation("x", "stop", 1, 1)

        async def generate_stream(
            self, request: GenerationRequest
        ) -> AsyncIterator[GenerationDelta]:
            yield GenerationDelta("x", "stop", 1, 1)

        async def predict(self, request: PredictionRequest) -> list[Any]:
            return []

    assert capability_methods(Both()) == ["generate", "generate_stream", "predict"]
    assert capability_methods(object()) == []
    assert set(protocol.CAPABILITIES) == {Generator, Embedder, Predictor}


def test_results_cross_a_process_boundary_by_value() -> None:
    """What a replica returns pickles whole: vectors, token counts, per-request errors."""
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    answers: list[Any] = [
        Embeddings(vectors, 7),
        InputTooLong("input 0 has 600 tokens"),
        Generation("hi", "length", 3, 4),
        GenerationDelta("h"),
        EmbedRequest(["a"], True, 5),
    ]
    back = pickle.loads(pickle.dumps(answers))
    assert np.array_equal(back[0].vectors, vectors) and back[0].prompt_tokens == 7
    assert isinstance(back[1], EngineError) and (back[1].status, back[1].code) == (
        413,
        "input_too_long",
    )
    assert back[2:] == answers[2:]


@pytest.mark.parametrize(
    "error",
    [
        EngineError(503, "busy", "retry shortly"),
        InputTooLong("too long"),
        DimensionMismatch("kb", 384, 768),
        InvalidFilter("filter: bad range"),
        Unreachable("the Kubernetes API", "kubernetes_unavailable"),
        ApiError(404, "model_not_found", "model 'x' is not loaded", headers={"X-A": "1"}),
    ],
)
def test_every_error_is_one_type_and_pickles_whatever_its_constructor(error: DifyError) -> None:
    assert isinstance(error, DifyError)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert (back.status, back.code, back.message, back.headers) == (
        error.status,
        error.code,
        error.message,
        error.headers,
    )
    assert str(back) == error.message


def test_an_error_from_any_layer_is_answered_in_one_shape(tmp_path: Path) -> None:
    """Engine, store and catalog errors raised under a route reach the client as JSON
    with their own status and code, mapped in one place (`gateway/errors.py`)."""
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    state = GatewayState(options)
    raised: list[DifyError] = [
        InputTooLong("input 0 has 600 tokens"),
        DimensionMismatch("kb", 384, 768),
        Unreachable("Ray Serve", "ray_unavailable", " to apply the change"),
    ]

    async def fail(name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        assert method == "predict"
        raise raised[0]

    state.model_replicas.call = fail  # type: ignore[method-assign]
    doc = {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": "clf"},
        "spec": {"modelId": "some/classifier", "task": "text-classification"},
    }
    from dify_serving.catalog.files import LocalStateStore
    from dify_serving.manifests import parse_documents
    from dify_serving.options import ServeOptions

    LocalStateStore(tmp_path).save(parse_documents([doc]), ServeOptions())
    with TestClient(create_app(state), raise_server_exceptions=False) as http:
        seen = []
        while raised:
            r = http.post("/v1/inference", json={"model": "clf", "input": ["x"]})
            seen.append((r.status_code, r.json()["error"]["code"], r.headers.get("retry-after")))
            raised.pop(0)
    assert seen == [
        (413, "input_too_long", None),
        (409, "dimension_mismatch", None),
        (503, "ray_unavailable", "2"),
    ]


def test_the_generation_request_measures_its_own_input() -> None:
    messages = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": None}]
    assert GenerationRequest(messages=messages).chars() == 3
    assert GenerationRequest(prompt="hello").chars() == 5
    assert asyncio.iscoroutinefunction(Generator.generate)
