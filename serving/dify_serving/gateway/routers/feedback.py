"""`POST /v1/models/feedback` (rate an answer) and `GET /v1/models/feedback` (read ratings).

Mounted before the model routes (`routers/__init__.py`), so `/v1/models/feedback` is
never taken for a model's name. Rating needs `inference`, the scope that got the answer;
reading everyone's ratings (comments included) needs `models:admin`, whose holders decide
which model and version serve. The work is the data plane's (`dataplane/feedback.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dify_serving.feedback import (
    MAX_COMMENT_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_SUBJECT_CHARS,
    RATINGS,
)
from dify_serving.gateway.dataplane import feedback as plane
from dify_serving.gateway.policy import needs
from dify_serving.gateway.routers.deps import AuditDep, StateDep, parse_time
from dify_serving.security.grants import INFERENCE, MODELS_ADMIN
from dify_serving.specs import NAME_PATTERN

router = APIRouter(prefix="/v1/models", tags=["models"])

_RATING_HINT = '1 to 5 (stars), or "up" / "down"'


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_REQUEST_ID_CHARS,
        description="The X-Request-ID of the answer rated (one of request_id, task_id).",
    )
    task_id: str | None = Field(
        None, min_length=1, max_length=64, description="Or the id of the inference task rated."
    )
    rating: int | Literal["up", "down"] = Field(..., description=f"{_RATING_HINT}.")
    comment: str | None = Field(
        None, max_length=MAX_COMMENT_CHARS, description="What the user said about the answer."
    )
    subject_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_SUBJECT_CHARS,
        description="Data subject the feedback is about: erasing the subject removes it.",
    )

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, value: Any) -> Any:
        if isinstance(value, bool | float) or str(value) not in RATINGS:
            raise PydanticCustomError(
                "rating", "give {hint}, not {value}", {"hint": _RATING_HINT, "value": repr(value)}
            )
        return int(value) if str(value).isdigit() else value

    @model_validator(mode="after")
    def _one_target(self) -> FeedbackRequest:
        if (self.request_id is None) == (self.task_id is None):
            raise PydanticCustomError("one_target", "give exactly one of request_id or task_id")
        return self


@router.post(
    "/feedback",
    status_code=201,
    summary="Rate an answer the caller got (201; 200 when it replaces the key's rating)",
    openapi_extra=needs(INFERENCE),
)
async def rate(
    body: Annotated[
        FeedbackRequest,
        Body(
            openapi_examples={
                "thumbs": {"value": {"request_id": "9f1c2e7a0b", "rating": "up"}},
                "stars": {
                    "value": {
                        "task_id": "task-0123456789abcdef01234567",
                        "rating": 2,
                        "comment": "right facts, wrong tone",
                        "subject_id": "customer-42",
                    }
                },
            }
        ),
    ],
    state: StateDep,
    audit: AuditDep,
) -> JSONResponse:
    saved, replaced = await plane.rate(
        state,
        audit,
        request_id=body.request_id,
        task_id=body.task_id,
        rating=str(body.rating),
        comment=body.comment,
        subject_id=body.subject_id,
    )
    return JSONResponse({**saved, "replaced": replaced}, status_code=200 if replaced else 201)


@router.get(
    "/feedback",
    summary="Ratings, newest first, paged by cursor (filters: model, version, rating, time)",
    openapi_extra=needs(MODELS_ADMIN),
)
async def list_feedback(
    state: StateDep,
    model: Annotated[str | None, Query(max_length=63, pattern=NAME_PATTERN)] = None,
    version: Annotated[str | None, Query(max_length=63)] = None,
    rating: Annotated[Literal[RATINGS] | None, Query()] = None,  # type: ignore[valid-type]
    key_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[
        str | None, Query(max_length=64, description="ISO time or unix seconds (inclusive).")
    ] = None,
    until: Annotated[
        str | None, Query(max_length=64, description="ISO time or unix seconds (exclusive).")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=plane.MAX_LIST)] = 50,
) -> dict[str, Any]:
    return await plane.listing(
        state,
        model=model,
        version=version,
        rating=rating,
        key_id=key_id,
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
        cursor=cursor,
        limit=limit,
    )
