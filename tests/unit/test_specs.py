"""The specs validate what users write, with messages that say what is wrong."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dify_serving.manifests import ManifestError, check_collections, parse_documents
from dify_serving.specs import (
    DifyIndex,
    DifyIndexSpec,
    DifyModel,
    DifyModelSpec,
    check_http_url,
    name_from_model_id,
    store_address,
)


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
        ({"modelId": "a/../../etc"}, "hub id"),
        ({"modelId": "org/name/extra"}, "hub id"),
        ({"modelId": "builtin:../x"}, "builtin:NAME"),
        ({"modelId": "m", "revision": "../../refs"}, "revision"),
        ({"modelId": "has space"}, "whitespace"),
        ({"modelId": "./models/x"}, "an absolute path"),
        ({"modelId": "~/models/x"}, "an absolute path"),
        ({"modelId": "../models/x"}, "an absolute path"),
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


@pytest.mark.parametrize(
    ("versions", "named"),
    [
        ([{"name": "a", "modelId": "x", "weight": 30}], "a=30 sum to 30, not 100"),
        (
            [{"name": "a", "modelId": "x", "weight": 60}, {"name": "b", "modelId": "y"}],
            "a=60, b=0 sum to 60, not 100",
        ),
    ],
)
def test_version_weights_must_sum_to_100(versions: list, named: str) -> None:
    with pytest.raises(ValidationError) as info:
        DifyModelSpec.model_validate({"modelId": "m", "versions": versions})
    assert named in str(info.value)
    with pytest.raises(ManifestError) as refused:  # manifests say it with the field's path
        parse_documents(
            [
                {
                    "kind": "DifyModel",
                    "metadata": {"name": "m"},
                    "spec": {"modelId": "m", "versions": versions},
                }
            ]
        )
    assert "spec.versions:" in str(refused.value) and named in str(refused.value)
    assert DifyModelSpec.model_validate({"modelId": "m", "versions": []}).versions == []


def test_versions_are_unique_and_a_rollout_names_only_them() -> None:
    twice = [
        {"name": "a", "modelId": "x", "weight": 50},
        {"name": "a", "modelId": "y", "weight": 50},
    ]
    with pytest.raises(ValidationError, match="a repeated"):
        DifyModelSpec.model_validate({"modelId": "m", "versions": twice})
    versions = [{"name": "a", "modelId": "x", "weight": 100}, {"name": "b", "modelId": "y"}]
    with pytest.raises(ValidationError, match="unknown versions c"):
        DifyModelSpec.model_validate(
            {"modelId": "m", "versions": versions, "rollout": {"target": {"c": 100}}}
        )
    spec = DifyModelSpec.model_validate(
        {"modelId": "m", "revision": "r", "versions": versions, "rollout": {"target": {"b": 100}}}
    )
    b = spec.for_version("b")
    assert (b.model_id, b.revision, b.versions, b.rollout) == ("y", None, [], None)


@pytest.mark.parametrize("collection", ["../x", "a/b", "/abs", "UPPER", "x" * 64, ".", ""])
def test_collection_is_a_name_not_a_path(collection: str) -> None:
    with pytest.raises(ValidationError, match="collection"):
        DifyIndexSpec.model_validate({"embeddingModel": "m", "store": {"collection": collection}})
    ok = DifyIndexSpec.model_validate({"embeddingModel": "m", "store": {"collection": "kb-2"}})
    assert ok.store.collection == "kb-2"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://qdrant:21",
        "gopher://h",
        "http://user:secret@qdrant:6333",
        "http://qdrant:6333/?api-key=x",
        "http://qdrant:99999",
        "http://qdrant:port",
        "http://",
        "qdrant:6333",
    ],
)
def test_store_url_must_be_plain_http(url: str) -> None:
    with pytest.raises(ValidationError, match=r"http\(s\) URL"):
        DifyIndexSpec.model_validate(
            {"embeddingModel": "m", "store": {"type": "qdrant", "url": url}}
        )


@pytest.mark.parametrize("url", ["http://qdrant:6333", "https://q.example.com/base/"])
def test_store_url_accepts_http_and_https(url: str) -> None:
    spec = DifyIndexSpec.model_validate(
        {"embeddingModel": "m", "store": {"type": "qdrant", "url": url}}
    )
    assert spec.store.url == url


@pytest.mark.parametrize("name", ["Bad", "a.b", "../x", "x" * 64, "-a"])
def test_object_names_are_rfc1123_labels(name: str) -> None:
    with pytest.raises(ValidationError, match="name"):
        DifyModel.model_validate({"metadata": {"name": name}, "spec": {"modelId": "m"}})
    with pytest.raises(ValidationError, match="name"):
        DifyIndex.model_validate({"metadata": {"name": name}, "spec": {"embeddingModel": "m"}})


def test_an_absolute_path_is_a_local_model_id() -> None:
    spec = DifyModelSpec.model_validate({"modelId": "/srv/models/m"})
    assert spec.model_id == "/srv/models/m"


def _kb_docs() -> list[dict]:
    index = {"kind": "DifyIndex", "metadata": {"name": "kb"}, "spec": {"embeddingModel": "e"}}
    other = {
        "kind": "DifyIndex",
        "metadata": {"name": "other"},
        "spec": {
            "embeddingModel": "e",
            "store": {"type": "qdrant", "url": "http://qdrant:6333", "collection": "kb"},
        },
    }
    return [index, other]


def test_the_collection_check_follows_where_an_embedded_index_really_goes() -> None:
    """An embedded index opens DIFY_MIRROR_QDRANT_URL when it is set (`open_backend`)."""
    state = parse_documents(_kb_docs())  # no setting known: embedded stays on disk
    kb = state.indexes["kb"].spec
    assert store_address(kb) is None and store_address(kb, "http://q:1") == "http://q:1"
    assert store_address(state.indexes["other"].spec, "http://q:1") == "http://qdrant:6333"
    check_collections(state, None)
    check_collections(state, "http://elsewhere:6333")
    with pytest.raises(ManifestError, match="'other' would share collection 'kb' with index 'kb'"):
        check_collections(state, "http://qdrant")  # the port qdrant-client fills in: 6333


def test_one_url_rule_names_the_setting_it_checks() -> None:
    assert check_http_url("https://q.example.com:443/base", "qdrant_url")
    with pytest.raises(ValueError, match=r"^qdrant_url must be an http\(s\) URL"):
        check_http_url("http://user:pw@q:6333", "qdrant_url")
