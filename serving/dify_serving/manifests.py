"""Read and write manifests: multi-document YAML of `DifyModel` / `DifyIndex` objects."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dify_serving.specs import (
    DifyIndex,
    DifyModel,
    shared_collection_message,
    shared_collections,
)


class ManifestError(ValueError):
    """A manifest that cannot be used; the message says which object and why."""


@dataclass
class DesiredState:
    """Everything the user asked for: the input of `render`."""

    models: dict[str, DifyModel] = field(default_factory=dict)
    indexes: dict[str, DifyIndex] = field(default_factory=dict)

    def documents(self) -> list[dict[str, Any]]:
        docs = [
            m.model_dump(by_alias=True, exclude_none=True, mode="json")
            for m in sorted(self.models.values(), key=lambda m: m.name)
        ]
        docs += [
            i.model_dump(by_alias=True, exclude_none=True, mode="json")
            for i in sorted(self.indexes.values(), key=lambda i: i.name)
        ]
        return docs


def parse_documents(documents: Iterable[Any], source: str = "manifest") -> DesiredState:
    state = DesiredState()
    for position, doc in enumerate(documents, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: document {position} is not a mapping")
        kind = doc.get("kind")
        where = f"{source}: {kind or 'document'} {doc.get('metadata', {}).get('name', position)}"
        try:
            if kind == "DifyModel":
                model = DifyModel.model_validate(doc)
                if model.name in state.models:
                    raise ManifestError(f"{where}: duplicate name")
                state.models[model.name] = model
            elif kind == "DifyIndex":
                index = DifyIndex.model_validate(doc)
                if index.name in state.indexes:
                    raise ManifestError(f"{where}: duplicate name")
                state.indexes[index.name] = index
            else:
                raise ManifestError(f"{where}: kind must be DifyModel or DifyIndex")
        except ValidationError as exc:
            raise ManifestError(f"{where}: {explain(exc)}") from None
    check_collections(state, None, source)
    return state


def check_collections(
    state: DesiredState, qdrant_url: str | None, source: str = "manifest"
) -> None:
    """Refuse two indexes on one collection of the store they really open.

    `qdrant_url` is the deployment's `DIFY_MIRROR_QDRANT_URL` (embedded indexes then
    live on that server); a manifest alone is checked without one, and the stack that
    applies it checks again with its own.
    """
    specs = [(name, index.spec) for name, index in state.indexes.items()]
    for name, owner in shared_collections(specs, qdrant_url).items():
        message = shared_collection_message(name, owner, state.indexes[name].spec)
        raise ManifestError(f"{source}: DifyIndex {name}: {message}")


def load_file(path: str | Path) -> DesiredState:
    path = Path(path)
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path} is not valid YAML: {exc}") from None
    return parse_documents(documents, source=str(path))


def explain(exc: ValidationError) -> str:
    """One line: each error as `where: why` (`spec.store.url: ...`), pydantic's own
    "Value error, " prefix dropped."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def merge_states(stored: DesiredState, incoming: DesiredState) -> tuple[DesiredState, list[str]]:
    """`incoming` (a manifests file) over what the state folder holds: the file's models
    and indexes win by name, the others stay (loaded over the API or with `apply`). Also
    returns what stayed, as `model NAME` / `index NAME`, so `serve` can say so."""
    models = {**stored.models, **incoming.models}
    indexes = {**stored.indexes, **incoming.indexes}
    kept = [f"model {n}" for n in sorted(stored.models) if n not in incoming.models]
    kept += [f"index {n}" for n in sorted(stored.indexes) if n not in incoming.indexes]
    return DesiredState(models, indexes), kept
