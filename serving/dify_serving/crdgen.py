"""Generate the CRDs in `crds/` from the pydantic specs.

Kubernetes wants a *structural* OpenAPI v3 schema: no `$ref`, no `anyOf` of types, every
object typed. Pydantic's JSON schema is close; this module inlines references, turns
`anyOf: [X, null]` into `X` with `nullable: true`, and drops what the API server rejects.
`make crds` writes the files; a test fails when the committed ones drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dify_serving import specs

_DROP = {"title", "discriminator", "examples"}


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
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("additionalProperties") is False:
        del out["additionalProperties"]
    if out.get("default", ...) is None:
        del out["default"]
    if "additionalProperties" in out and out["additionalProperties"] is True:
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
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
