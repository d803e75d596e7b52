"""Index routes: list, create (`POST /v1/indexes`), delete (`DELETE /v1/indexes/{name}`).

Creating and deleting change the desired state as `POST /v1/models/load` does, so they
need what loading a model needs (`models:admin`, a second factor for keys that have one)
and what writing data needs (`data:write`): both. The work is the data plane's
(`dataplane/indexes.py`); listing stays with the data plane's other index reads.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from fastapi.responses import JSONResponse

from dify_serving.gateway.dataplane import data
from dify_serving.gateway.dataplane import indexes as plane
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import StateDep
from dify_serving.gateway.schemas import CreateIndexRequest
from dify_serving.security.grants import DATA_READ, DATA_WRITE, MODELS_ADMIN
from dify_serving.specs import NAME_PATTERN

router = APIRouter(prefix="/v1/indexes", tags=["data"])


@router.get(
    "",
    summary="Indexes: model, dimension, points, status",
    openapi_extra=needs(DATA_READ),
)
async def list_indexes(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": await data.list_indexes(state)}


@router.post(
    "",
    status_code=202,
    summary="Create an index from a DifyIndex spec; 409 if it exists",
    openapi_extra=needs(DATA_WRITE, MODELS_ADMIN, sensitive=True),
)
async def create_index(
    state: StateDep,
    body: Annotated[
        CreateIndexRequest,
        Body(
            openapi_examples={
                "embedded": {
                    "value": {
                        "name": "kb",
                        "embeddingModel": "minilm",
                        "chunking": {"maxTokens": 256, "overlap": 32},
                        "filterableFields": ["lang"],
                        "reclaimPolicy": "Delete",
                    }
                }
            }
        ),
    ],
) -> dict[str, Any]:
    return await plane.create(state, body)


@router.delete(
    "/{name}",
    summary="Delete an index: its replica, then its vectors if reclaimPolicy is Delete",
    openapi_extra=needs(DATA_WRITE, MODELS_ADMIN, sensitive=True),
    responses={202: {"description": "Accepted: the replica or the operator finishes it"}},
)
async def delete_index(
    name: Annotated[str, Path(max_length=63, pattern=NAME_PATTERN)], state: StateDep
) -> Any:
    done, body = await plane.delete(state, name)
    return body if done else JSONResponse(body, status_code=202)
