"""The CRDs in crds/ are what the specs generate, and every example validates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from dify_serving import crdgen
from dify_serving.specs import NAME_PATTERN, DifyModelSpec

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
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(exclusive) is True:  # OpenAPI v3.0's flag → JSON Schema's number
            out[exclusive] = out.pop(bound)
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
        (
            {
                "kind": "DifyModel",
                "metadata": {"name": "m"},
                "spec": {"modelId": "m", "generation": {"topP": 0}},
            },
            "DifyModel",
        ),
        (
            {
                "kind": "DifyModel",
                "metadata": {"name": "m"},
                "spec": {"modelId": "m", "autoscaling": {"targetOngoingRequests": 0}},
            },
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


# --- what the API server itself checks before it stores a CRD ---------------------------
#: JSONSchemaProps fields of apiextensions.k8s.io/v1 the API server accepts in a CRD (it
#: forbids `id`, `$ref`, `definitions`, `dependencies`, `additionalItems` and
#: `patternProperties`, and JSON Schema keywords such as `propertyNames` or `const` are no
#: fields at all).
_JSON_SCHEMA_PROPS = {
    *("type", "format", "description", "default", "nullable", "enum", "example"),
    *("maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "multipleOf"),
    *("maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "items"),
    *("maxProperties", "minProperties", "required", "properties", "additionalProperties"),
    *("allOf", "anyOf", "oneOf", "not", "externalDocs", "title"),
    *("x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"),
    *("x-kubernetes-embedded-resource", "x-kubernetes-list-type", "x-kubernetes-list-map-keys"),
    *("x-kubernetes-map-type", "x-kubernetes-validations"),
}
#: Inside allOf/anyOf/oneOf/not a structural schema only restricts values.
_NOT_IN_JUNCTORS = {"type", "nullable", "default", "description", "additionalProperties"}


def _structural_problems(node: dict[str, Any], path: str, in_junctor: bool = False) -> list[str]:
    """The rules of https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
    custom-resource-definitions/#specifying-a-structural-schema, and the API server's
    field checks (apiextensions validation.go), for one schema node and what it holds."""
    problems = [f"{path}: {k} is no CRD schema field" for k in set(node) - _JSON_SCHEMA_PROPS]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            problems.append(f"{path}: {key} must be a boolean beside minimum/maximum")
        if node.get(key) and key.replace("exclusiveM", "m") not in node:
            problems.append(f"{path}: {key} without {key.replace('exclusiveM', 'm')}")
    if node.get("uniqueItems"):
        problems.append(f"{path}: uniqueItems may not be true")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties may not be false")
    if in_junctor:
        problems += [f"{path}: {k} inside a junctor" for k in _NOT_IN_JUNCTORS & set(node)]
    elif not (
        node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}
        or node.get("x-kubernetes-preserve-unknown-fields")
        or node.get("x-kubernetes-int-or-string")
    ):
        problems.append(f"{path}: no type")
    for rule in node.get("x-kubernetes-validations", []):
        if set(rule) - {"rule", "message", "messageExpression", "reason", "fieldPath"}:
            problems.append(f"{path}: x-kubernetes-validations {rule}")
    children = [(f"{path}.{k}", v, in_junctor) for k, v in node.get("properties", {}).items()]
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            children.append((f"{path}[{key}]", node[key], in_junctor))
    for key in ("allOf", "anyOf", "oneOf"):
        children += [(f"{path}[{key}]", sub, True) for sub in node.get(key, [])]
    if "not" in node:
        children.append((f"{path}[not]", node["not"], True))
    for where, sub, junctor in children:
        problems += _structural_problems(sub, where, junctor)
    return problems


@pytest.mark.parametrize("filename", sorted(crdgen.all_crds()))
def test_every_schema_is_one_the_api_server_accepts(filename: str) -> None:
    doc = yaml.safe_load((ROOT / "crds" / filename).read_text())
    for version in doc["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        problems = _structural_problems(schema, version["name"])
        assert not problems, "\n".join(problems)


def test_map_keys_are_checked_by_a_cel_rule() -> None:
    """JSON Schema's patternProperties/propertyNames become values' additionalProperties
    and one CEL rule on the keys (the API server refuses both keywords)."""
    spec = crdgen.all_crds()["difymodels.yaml"]["spec"]["versions"][0]["schema"]
    rollout = spec["openAPIV3Schema"]["properties"]["spec"]["properties"]["rollout"]
    for field in ("target", "previous"):
        weights = rollout["properties"][field]
        assert weights["additionalProperties"] == {"maximum": 100, "minimum": 0, "type": "integer"}
        assert weights["maxProperties"] == 16  # bounds the rule's cost for the API server
        assert weights["x-kubernetes-validations"] == [
            {
                "rule": f"self.all(k, size(k) <= 63 && k.matches('{NAME_PATTERN}'))",
                "message": f"keys must have at most 63 characters and match {NAME_PATTERN}",
            }
        ]


def test_exclusive_bounds_are_openapi_v3_0() -> None:
    schema = crdgen.openapi_schema(DifyModelSpec)["properties"]
    assert {k: schema["generation"]["properties"]["topP"].get(k) for k in _BOUNDS} == {
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 1,
        "exclusiveMaximum": None,
    }
    target = schema["autoscaling"]["properties"]["targetOngoingRequests"]
    assert (target["minimum"], target["exclusiveMinimum"]) == (0, True)


_BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (
            {"type": "number", "exclusiveMinimum": 2, "minimum": 1},
            {"minimum": 2, "exclusiveMinimum": True},
        ),
        ({"type": "number", "exclusiveMinimum": 1, "minimum": 2}, {"minimum": 2}),
        (
            {"type": "number", "exclusiveMaximum": 5, "maximum": 9},
            {"maximum": 5, "exclusiveMaximum": True},
        ),
        ({"type": "number", "exclusiveMaximum": 9, "maximum": 5}, {"maximum": 5}),
    ],
)
def test_the_stricter_bound_wins(field: dict[str, Any], expected: dict[str, Any]) -> None:
    out = crdgen._structural(field, {})
    assert {k: v for k, v in out.items() if k in _BOUNDS} == expected


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        {"type": "object", "dependentRequired": {"a": ["b"]}},
        {
            "type": "object",
            "properties": {"a": {"type": "string"}},
            "additionalProperties": {"type": "string"},
        },
        {
            "type": "object",
            "patternProperties": {"^a": {"type": "string"}, "^b": {"type": "string"}},
        },
    ],
)
def test_what_has_no_crd_form_fails_generation(schema: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        crdgen._structural(schema, {})


def test_the_spec_refuses_what_the_crd_rules_refuse() -> None:
    """The gateway and the local stack read manifests with pydantic alone: same bounds."""
    versions = [{"name": "a", "modelId": "x", "weight": 100}]
    for bad in (
        {"generation": {"topP": 0}},
        {"autoscaling": {"targetOngoingRequests": 0}},
        {"versions": versions, "rollout": {"target": {"A": 100}}},
        {"versions": versions, "rollout": {"target": {"a" * 64: 100}}},
    ):
        with pytest.raises(ValidationError):
            DifyModelSpec.model_validate({"modelId": "m", **bad})
    DifyModelSpec.model_validate(
        {
            "modelId": "m",
            "generation": {"topP": 0.01},
            "versions": versions,
            "rollout": {"target": {"a": 100}},
        }
    )
