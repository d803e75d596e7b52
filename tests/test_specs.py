"""The specs validate what users write, with messages that say what is wrong."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dify_serving.specs import DifyIndexSpec, DifyModelSpec, name_from_model_id


def test_camel_and_snake_case_both_accepted() -> None:
    a = DifyModelSpec.model_validate({"modelId": "x/y", "task": "feature-extraction"})
    b = DifyModelSpec.model_validate({"model_id": "x/y", "task": "feature-extraction"})
    assert a == b
    assert a.wire()["modelId"] == "x/y"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"modelId": "m", "task": "translation"}, "task"),
        ({"modelId": "m", "device": "tpu"}, "device"),
        ({"modelId": "m", "precision": "int3"}, "precision"),
        ({"modelId": "m", "replicas": -1}, "replicas"),
        ({"modelId": "m", "autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "maxReplicas"),
        ({"modelId": "m", "versions": [{"name": "a", "modelId": "x", "weight": 30}]}, "100"),
        ({"modelId": "has space"}, "whitespace"),
        ({"modelId": "m", "colour": "red"}, "colour"),
        ({"task": "text-generation"}, "modelId"),
    ],
)
def test_invalid_model_specs_name_the_problem(body: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        DifyModelSpec.model_validate(body)
    assert needle in str(info.value)


def test_index_spec_limits() -> None:
    spec = DifyIndexSpec.model_validate({"embeddingModel": "minilm"})
    assert spec.chunking.max_tokens == 512
    with pytest.raises(ValidationError, match=r"maxTokens|max_tokens"):
        DifyIndexSpec.model_validate({"embeddingModel": "minilm", "chunking": {"maxTokens": 1024}})
    with pytest.raises(ValidationError, match="overlap"):
        DifyIndexSpec.model_validate(
            {"embeddingModel": "minilm", "chunking": {"maxTokens": 64, "overlap": 64}}
        )
    with pytest.raises(ValidationError, match="url"):
        DifyIndexSpec.model_validate({"embeddingModel": "minilm", "store": {"type": "qdrant"}})


@pytest.mark.parametrize(
    ("model_id", "name"),
    [
        ("ernie-3.5-turbo", "ernie-3-5-turbo"),
        ("sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2"),
        ("builtin:demo-llm", "demo-llm"),
        ("/models/My_Model/", "my-model"),
    ],
)
def test_name_from_model_id(model_id: str, name: str) -> None:
    assert name_from_model_id(model_id) == name


def test_name_from_model_id_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="cannot derive"):
        name_from_model_id("___")
