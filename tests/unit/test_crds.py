"""The CRDs in crds/ are what the specs generate, and every example validates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dify_serving import crdgen

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("filename", sorted(crdgen.all_crds()))
def test_committed_crds_match_the_specs(filename: str) -> None:
    committed = (ROOT / "crds" / filename).read_text()
    assert committed == crdgen.render_yaml(crdgen.all_crds()[filename]), (
        f"crds/{filename} is stale: run `make crds`"
    )


def _jsonschema(node: Any) -> Any:
    """OpenAPI v3 (nullable) → JSON Schema (type: [t, null]) for validation in tests."""
    if isinstance(node, list):
        return [_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        node.get("type") == "object"
        and "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # the API server prunes unknown fields
    return out


def _schemas() -> dict[str, Any]:
    out = {}
    for doc in crdgen.all_crds().values():
        version = doc["spec"]["versions"][0]
        out[doc["spec"]["names"]["kind"]] = _jsonschema(version["schema"]["openAPIV3Schema"])
    return out


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_their_crd(path: Path) -> None:
    schemas = _schemas()
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        jsonschema.validate(doc, schemas[doc["kind"]])


def test_schema_rejects_what_the_spec_rejects() -> None:
    schema = _schemas()["DifyModel"]
    bad = {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyModel",
        "metadata": {"name": "x"},
        "spec": {"modelId": "m", "precision": "fp8"},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_crd_shape() -> None:
    doc = crdgen.all_crds()["difymodels.yaml"]
    version = doc["spec"]["versions"][0]
    assert doc["spec"]["group"] == "difymirror.dev"
    assert doc["spec"]["names"]["shortNames"] == ["dm"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Model",
        "Ready",
        "Age",
    ]
    text = yaml.safe_dump(doc)
    assert "$ref" not in text and "anyOf" not in text
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert all("description" in p for p in spec["properties"].values())


def _index(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "difymirror.dev/v1alpha1",
        "kind": "DifyIndex",
        "metadata": {"name": name},
        "spec": {"embeddingModel": "minilm", **spec},
    }


@pytest.mark.parametrize(
    ("doc", "kind"),
    [
        (_index("kb", store={"collection": "../x"}), "DifyIndex"),
        (_index("kb", store={"type": "qdrant", "url": "file:///etc"}), "DifyIndex"),
        (_index("kb", store={"type": "qdrant", "url": "http://u:p@q:6333"}), "DifyIndex"),
        (_index("Bad.Name"), "DifyIndex"),
        (_index("x" * 64), "DifyIndex"),
        (
            {"kind": "DifyModel", "metadata": {"name": "m"}, "spec": {"modelId": "a/../../b"}},
            "DifyModel",
        ),
        (
            {"kind": "DifyModel", "metadata": {"name": "a.b"}, "spec": {"modelId": "m"}},
            "DifyModel",
        ),
    ],
)
def test_the_api_server_refuses_names_and_urls_the_spec_refuses(
    doc: dict[str, Any], kind: str
) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _schemas()[kind])


def test_metadata_restricts_only_the_name() -> None:
    """Kubernetes allows a CRD to restrict metadata.name and nothing else in metadata."""
    for doc in crdgen.all_crds().values():
        metadata = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"]
        assert set(metadata) == {"type", "properties"} and set(metadata["properties"]) == {"name"}
