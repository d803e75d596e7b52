"""Indexes over HTTP: create one from a DifyIndex spec, delete one by its reclaim policy.

The same objects a manifest holds (`specs.DifyIndexSpec` validates both), written where
the desired state lives (`catalog`): the state file and Serve on one machine, a
`DifyIndex` object in a cluster. As a Kubernetes create, a create of a name that exists
is a 409, never a silent replace of a spec whose vectors another model made. An index
whose embedding model is missing or does not embed is accepted and says so in its phase
(Pending / Failed with the reason), as the same spec from a manifest does: the desired
state is level-based, and the model may well be loaded after the index.
"""

from __future__ import annotations

from typing import Any

from dify_serving.gateway import access
from dify_serving.gateway.notes import note
from dify_serving.gateway.schemas import CreateIndexRequest
from dify_serving.gateway.state import GatewayState
from dify_serving.specs import DifyIndex, DifyIndexSpec, ObjectMeta

STATUS_URL = "/v1/indexes"


async def create(state: GatewayState, body: CreateIndexRequest) -> dict[str, Any]:
    """Put the index in the catalog; its first phase and why."""
    access.check_index(body.name)
    # an index embeds with its model and searches answer through it: a key confined to
    # some models may not build one on another
    access.check_model(body.embedding_model)
    spec = DifyIndexSpec.model_validate(body.model_dump(exclude={"name"}))
    index = DifyIndex(metadata=ObjectMeta(name=body.name), spec=spec)
    note(index=index.name, detail=f"create index {index.name} ({spec.reclaim_policy})")
    status = await state.create_index(index)
    return {
        "name": index.name,
        "phase": status["phase"],
        "message": status.get("message"),
        "status_url": STATUS_URL,
    }


async def delete(state: GatewayState, name: str) -> tuple[bool, dict[str, Any]]:
    """Remove the index; (done, body): done False while its replica stops or the operator
    finishes (202), True once the vectors are deleted or retained (200)."""
    access.check_index(name)
    note(index=name)
    removal = await state.delete_index(name)
    note(detail=f"delete index {name}: vectors {removal.vectors}")
    body = {
        "name": name,
        "phase": "Deleted" if removal.done else "Deleting",
        "reclaim_policy": removal.reclaim_policy,
        "vectors": removal.vectors,
        "message": removal.message,
    }
    if not removal.done:
        body["status_url"] = STATUS_URL
    return removal.done, body
