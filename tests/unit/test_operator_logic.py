"""The operator's reconcile logic as pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from dify_operator import reconcile
from dify_operator.settings import OperatorSettings
from dify_serving.manifests import ManifestError, parse_documents
from dify_serving.specs import DifyIndexSpec


def body(name: str, spec: dict[str, Any], deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-23T00:00:00Z"
    return {"metadata": meta, "spec": spec}


def test_desired_state_skips_invalid_and_deleting_objects() -> None:
    state, invalid = reconcile.desired_state(
        [
            body("a", {"modelId": "m"}),
            body("b", {"modelId": "m", "precision": "fp99"}),
            body("c", {"modelId": "m"}, deleting=True),
        ],
        [body("i", {"embeddingModel": "a"}), body("j", {"chunking": {"maxTokens": 2}})],
    )
    assert list(state.models) == ["a"] and list(state.indexes) == ["i"]
    assert "spec.precision" in invalid["b"]
    assert "embeddingModel" in invalid["index/j"]


def test_render_is_level_based_and_cluster_shaped() -> None:
    settings = OperatorSettings()
    models = [body("b", {"modelId": "m"}), body("a", {"modelId": "m"})]
    one, _ = reconcile.desired_state(models, [])
    two, _ = reconcile.desired_state(list(reversed(models)), [])
    options = reconcile.serve_options(settings)
    assert options.gateway.control == "kubernetes" and options.host == "0.0.0.0"
    from dify_serving.render import render_serve_config

    c1, c2 = render_serve_config(one, options), render_serve_config(two, options)
    assert reconcile.config_hash(c1) == reconcile.config_hash(c2)


def test_conditions_keep_transition_time_while_status_holds() -> None:
    first = reconcile.merge_conditions(
        None, [reconcile.condition("Ready", False, "Loading", "x")], 1
    )
    first[0]["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    same = reconcile.merge_conditions(
        first, [reconcile.condition("Ready", False, "Loading", "y")], 2
    )
    assert same[0]["lastTransitionTime"] == "2000-01-01T00:00:00Z"
    assert same[0]["observedGeneration"] == 2 and same[0]["message"] == "y"
    flipped = reconcile.merge_conditions(
        same, [reconcile.condition("Ready", True, "Ready", "ok")], 2
    )
    assert flipped[0]["lastTransitionTime"] != "2000-01-01T00:00:00Z"
    assert flipped[0]["status"] == "True"


def test_model_status_fields_from_serve() -> None:
    spec = reconcile.parse_model("m", {"modelId": "x"}).spec
    apps = {
        "model-m": {
            "status": "RUNNING",
            "deployments": {
                "ModelServer": {"target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}
            },
        }
    }
    fields = reconcile.model_status_fields("m", spec, apps, "http://gw/v1")
    assert fields["phase"] == "Ready" and fields["readyReplicas"] == 1
    assert fields["endpoint"] == "http://gw/v1" and fields["_ready"]["status"] == "True"
    pending = reconcile.model_status_fields("m", spec, {}, "http://gw/v1")
    assert pending["phase"] == "Pending" and pending["endpoint"] is None


def test_status_patch_is_empty_when_nothing_changes() -> None:
    fields = {"phase": "Ready", "message": "ok"}
    assert reconcile.status_patch({"phase": "Ready", "message": "ok"}, fields, 1) == {}
    assert reconcile.status_patch({"phase": "Loading", "message": "ok"}, fields, 1) == {
        "phase": "Ready"
    }


@pytest.mark.parametrize(
    ("models", "phases", "phase", "reason"),
    [
        ({}, {}, "Pending", "EmbeddingModelMissing"),
        (
            {"minilm": "feature-extraction"},
            {"minilm": "Loading"},
            "Pending",
            "EmbeddingModelNotReady",
        ),
        ({"minilm": "feature-extraction"}, {"minilm": "Ready"}, "Ready", "EmbeddingModelReady"),
        ({"minilm": "text-generation"}, {"minilm": "Ready"}, "Failed", "WrongModelTask"),
    ],
)
def test_index_follows_its_embedding_model(
    models: dict[str, str], phases: dict[str, str], phase: str, reason: str
) -> None:
    parsed = {n: reconcile.parse_model(n, {"modelId": "x", "task": t}) for n, t in models.items()}
    spec = DifyIndexSpec.model_validate({"embeddingModel": "minilm"})
    fields, extra = reconcile.index_status_fields(spec, parsed, phases)
    assert fields["phase"] == phase and fields["_ready"]["reason"] == reason
    assert extra == []


def test_an_index_on_another_index_collection_is_invalid() -> None:
    shared = {"collection": "kb"}
    remote = {"type": "qdrant", "url": "http://Qdrant:6333/", "collection": "docs"}
    state, invalid = reconcile.desired_state(
        [body("emb", {"modelId": "m", "task": "feature-extraction"})],
        [
            body("b-second", {"embeddingModel": "emb", "store": shared}),
            body("a-first", {"embeddingModel": "emb", "store": shared}),
            body("kb", {"embeddingModel": "emb"}),  # the default collection is its name
            body("remote-1", {"embeddingModel": "emb", "store": remote}),
            body(
                "remote-2",
                {"embeddingModel": "emb", "store": {**remote, "url": "http://qdrant:6333"}},
            ),
            body(
                "other-server",
                {"embeddingModel": "emb", "store": {**remote, "url": "http://q2:6333"}},
            ),
        ],
    )
    assert sorted(state.indexes) == ["a-first", "other-server", "remote-1"]
    assert "'a-first'" in invalid["index/b-second"] and "'kb'" in invalid["index/b-second"]
    assert "'a-first'" in invalid["index/kb"]
    assert "'remote-1'" in invalid["index/remote-2"]
    fields, extra = reconcile.index_status_fields(
        state.indexes["a-first"].spec, state.models, {}, None, invalid["index/kb"]
    )
    assert fields["phase"] == "Failed" and fields["message"] == invalid["index/kb"]
    assert fields["_ready"]["reason"] == "InvalidSpec"
    assert [(c["type"], c["status"], c["reason"]) for c in extra] == [
        ("Reconciled", "False", "InvalidSpec")
    ]
    assert not [key for key in fields if key.startswith("_") and key != "_ready"]
    patch = reconcile.status_patch({}, fields, 3, extra)
    assert {c["type"]: c["status"] for c in patch["conditions"]} == {
        "Ready": "False",
        "Reconciled": "False",
    }


def test_an_embedded_index_on_the_global_qdrant_clashes_with_one_naming_that_server() -> None:
    """With DIFY_MIRROR_QDRANT_URL set, embedded indexes live on that server: `kb`
    (embedded) and `other` (type qdrant, the same server, collection kb) share one
    collection, and reclaiming either would drop the other's vectors."""
    same_server = {"type": "qdrant", "url": "http://QDRANT:6333/", "collection": "kb"}
    models = [body("emb", {"modelId": "m", "task": "feature-extraction"})]
    indexes = [
        body("kb", {"embeddingModel": "emb"}),
        body("other", {"embeddingModel": "emb", "store": same_server}),
    ]
    alone, invalid = reconcile.desired_state(models, indexes)  # embedded: on disk, apart
    assert sorted(alone.indexes) == ["kb", "other"] and invalid == {}
    for url in ("http://qdrant:6333", "http://qdrant"):  # qdrant-client's port: 6333
        state, invalid = reconcile.desired_state(models, indexes, qdrant_url=url)
        assert sorted(state.indexes) == ["kb"], url
        assert "'kb'" in invalid["index/other"]
    assert reconcile.desired_state(models, indexes, "http://qdrant:80")[1] == {}
    kb = reconcile.parse_index("kb", {"embeddingModel": "emb"}).spec
    assert reconcile.collection_users("kb", kb, indexes) == []
    assert reconcile.collection_users("kb", kb, indexes, "http://qdrant:6333") == ["other"]


def test_reclaim_keeps_a_collection_another_index_uses() -> None:
    spec = DifyIndexSpec.model_validate({"embeddingModel": "e", "store": {"collection": "kb"}})
    bodies = [
        body("old", {"embeddingModel": "e", "store": {"collection": "kb"}}, deleting=True),
        body("kb", {"embeddingModel": "e"}),
        body("other", {"embeddingModel": "e"}),
    ]
    assert reconcile.collection_users("old", spec, bodies) == ["kb"]
    assert reconcile.collection_users("old", spec, bodies[:1] + bodies[2:]) == []


@pytest.mark.parametrize("name", ["a.b", "Upper", "x" * 64])
def test_names_kubernetes_accepts_but_paths_cannot_carry_are_invalid(name: str) -> None:
    _, invalid = reconcile.desired_state(
        [body(name, {"modelId": "m"})], [body(name, {"embeddingModel": "m"})]
    )
    assert "metadata.name" in invalid[name] and "metadata.name" in invalid[f"index/{name}"]


def test_the_operator_explains_an_object_as_a_manifest_does() -> None:
    """One explanation of a bad object: the operator's is the manifest's, name and spec."""
    doc = {"kind": "DifyModel", "metadata": {"name": "Bad.Name"}, "spec": {"precision": "x"}}
    with pytest.raises(ManifestError) as manifest:
        parse_documents([doc])
    with pytest.raises(ValueError) as operator:
        reconcile.parse_model("Bad.Name", {"precision": "x"})
    assert str(manifest.value).endswith(str(operator.value))
    assert "metadata.name" in str(operator.value) and "spec.modelId" in str(operator.value)


def test_bad_version_weights_reach_the_status_as_a_clear_refusal() -> None:
    _, invalid = reconcile.desired_state(
        [body("m", {"modelId": "m", "versions": [{"name": "v2", "modelId": "x"}]})], []
    )
    assert invalid["m"].startswith("spec.versions:") and "v2=0 sum to 0, not 100" in invalid["m"]
