"""Generate the CRDs in `crds/` from the pydantic specs.

Kubernetes wants a *structural* OpenAPI v3 schema: no `$ref`, no `anyOf` of types, every
object typed. Pydantic's JSON schema is close; this module inlines references, turns
`anyOf: [X, null]` into `X` with `nullable: true`, and drops what the API server rejects.
JSON Schema keeps two things OpenAPI v3.0 spells differently: a numeric `exclusiveMinimum`
becomes `minimum` plus the boolean, and a map's key rules (`patternProperties`,
`propertyNames`, both refused by the API server) become `additionalProperties` and one CEL
rule over the keys. Any other keyword the API server would refuse fails generation here
rather than `kubectl apply` in a cluster. `make crds` writes the files; a test fails when
the committed ones drift.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from dify_serving import specs

_DROP = {"title", "discriminator", "examples"}

#: The JSONSchemaProps fields of apiextensions.k8s.io/v1 a structural schema may use
#: (`id`, `$ref`, `definitions`, `dependencies`, `additionalItems` and `patternProperties`
#: are fields the API server forbids; JSON Schema's newer keywords are no fields at all).
#: `allOf`/`anyOf`/`oneOf`/`not` are left out too: structural ones may not type anything,
#: which is all pydantic writes them for.
_ALLOWED = frozenset(
    {
        "type",
        "format",
        "description",
        "default",
        "nullable",
        "enum",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "multipleOf",
        "maxLength",
        "minLength",
        "pattern",
        "maxItems",
        "minItems",
        "uniqueItems",
        "items",
        "maxProperties",
        "minProperties",
        "required",
        "properties",
        "additionalProperties",
        "example",
        "externalDocs",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-int-or-string",
        "x-kubernetes-embedded-resource",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-validations",
    }
)

#: Keys whose value is a schema (or a list of them) rather than data.
_SUBSCHEMAS = frozenset(
    {"items", "additionalProperties", "propertyNames", "allOf", "anyOf", "oneOf", "not"}
)


def _cel_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _inclusive_bounds(out: dict[str, Any]) -> None:
    """JSON Schema's numeric `exclusiveMinimum: x` → OpenAPI v3.0's `minimum: x` with
    `exclusiveMinimum: true` (and the same for the maximum), keeping the stricter bound."""
    for exclusive, bound, stricter in (
        ("exclusiveMinimum", "minimum", max),
        ("exclusiveMaximum", "maximum", min),
    ):
        value = out.get(exclusive)
        if value is None or isinstance(value, bool):
            continue
        if bound in out and stricter(out[bound], value) != value:
            del out[exclusive]  # the inclusive bound is stricter already
            continue
        out[bound] = value
        out[exclusive] = True


def _map_keys(out: dict[str, Any]) -> None:
    """A map's key rules as one CEL rule over `self`'s keys, its values' schema as
    `additionalProperties` (the API server refuses `patternProperties` and `propertyNames`)."""
    patterns = out.pop("patternProperties", None)
    names = dict(out.pop("propertyNames", None) or {})
    if patterns is None and not names:
        return
    checks: list[tuple[str, str]] = []  # (CEL over the key k, what it says)
    if "maxLength" in names:
        most = int(names.pop("maxLength"))
        checks.append((f"size(k) <= {most}", f"have at most {most} characters"))
    if "minLength" in names:
        least = int(names.pop("minLength"))
        checks.append((f"size(k) >= {least}", f"have at least {least} characters"))
    key_patterns = [names.pop("pattern")] if "pattern" in names else []
    if names:
        raise ValueError(f"propertyNames {sorted(names)} has no CRD equivalent")
    if patterns is not None:
        if len(patterns) != 1 or "properties" in out or "additionalProperties" in out:
            raise ValueError("only a map with one key pattern has a CRD equivalent")
        ((pattern, values),) = patterns.items()
        out["additionalProperties"] = values
        key_patterns.append(pattern)
    checks += [(f"k.matches({_cel_string(p)})", f"match {p}") for p in dict.fromkeys(key_patterns)]
    rule = " && ".join(check for check, _ in checks)
    message = " and ".join(said for _, said in checks)
    out.setdefault("x-kubernetes-validations", []).append(
        {"rule": f"self.all(k, {rule})", "message": f"keys must {message}"}
    )


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _structural({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            merged: dict[str, Any] = _structural({**options[0], **rest}, defs)
            if nullable:
                merged["nullable"] = True
                if merged.get("default", ...) is None:
                    del merged["default"]
            return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "const":
            out["enum"] = [value]
        elif key in _SUBSCHEMAS:
            out[key] = _structural(value, defs)
        else:
            out[key] = copy.deepcopy(value)  # data (default, enum, bound), never a schema
    _inclusive_bounds(out)
    _map_keys(out)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("additionalProperties") is False:
        del out["additionalProperties"]
    if out.get("default", ...) is None:
        del out["default"]
    if "additionalProperties" in out and out["additionalProperties"] is True:
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
    refused = sorted(set(out) - _ALLOWED)
    if refused:
        raise ValueError(f"no structural CRD schema has {', '.join(refused)}: {out}")
    if "properties" in out and "additionalProperties" in out:
        raise ValueError(f"a CRD schema has properties or additionalProperties, not both: {out}")
    if out.get("uniqueItems"):
        raise ValueError(f"the API server refuses uniqueItems (quadratic to check): {out}")
    return out


def openapi_schema(model: type[specs.BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model (camelCase keys)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def _status_schema(model: type[specs.BaseModel]) -> dict[str, Any]:
    schema = openapi_schema(model)
    schema["properties"]["conditions"] = {
        "type": "array",
        "description": "Kubernetes-style conditions (Ready, Reconciled).",
        "items": {
            "type": "object",
            "required": ["type", "status"],
            "properties": {
                "type": {"type": "string"},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string"},
                "message": {"type": "string"},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer"},
            },
        },
    }
    schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


#: The API server accepts dotted names up to 253 characters; ours become app names,
#: folder names and URL segments, so they are labels (the only metadata a CRD may restrict).
_METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": specs.NAME_PATTERN},
    },
}


def crd(
    kind: str,
    plural: str,
    short: str,
    spec_model: type[specs.BaseModel],
    status_model: type[specs.BaseModel],
    model_column: str,
) -> dict[str, Any]:
    """One CustomResourceDefinition with status subresource and printer columns."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{specs.GROUP}"},
        "spec": {
            "group": specs.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["dify-mirror"],
            },
            "versions": [
                {
                    "name": specs.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Model", "type": "string", "jsonPath": model_column},
                        {
                            "name": "Ready",
                            "type": "integer",
                            "jsonPath": ".status.readyReplicas",
                        },
                        {
                            "name": "Age",
                            "type": "date",
                            "jsonPath": ".metadata.creationTimestamp",
                        },
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": spec_model.__doc__.strip().splitlines()[0]
                            if spec_model.__doc__
                            else kind,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": _METADATA,
                                "spec": openapi_schema(spec_model),
                                "status": _status_schema(status_model),
                            },
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name → CRD document, for everything in `crds/`."""
    return {
        "difymodels.yaml": crd(
            "DifyModel",
            "difymodels",
            "dm",
            specs.DifyModelSpec,
            specs.DifyModelStatus,
            ".spec.modelId",
        ),
        "difyindexes.yaml": crd(
            "DifyIndex",
            "difyindexes",
            "di",
            specs.DifyIndexSpec,
            specs.DifyIndexStatus,
            ".spec.embeddingModel",
        ),
    }


def render_yaml(doc: dict[str, Any]) -> str:
    header = "# Generated from dify_serving.specs by `make crds`. Do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, doc in all_crds().items():
        path = directory / filename
        path.write_text(render_yaml(doc))
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - `make crds`
    import sys

    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "crds")):
        print(f"wrote {path}")
