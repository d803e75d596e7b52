"""Wire schemas of the gateway (requests and responses), apart from the routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParams(_Body):
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0, le=5, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass, (0, 1].")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling repeatable.")


class InferenceRequest(SamplingParams):
    model: str | None = Field(None, description="Model name; the default model if left out.")
    prompt: str | None = Field(
        None, min_length=1, description="Text to continue (text-generation)."
    )
    input: str | list[Any] | None = Field(
        None, description="Inputs for other tasks: texts, or base64 images."
    )
    top_k: int | None = Field(None, ge=1, le=1000, description="Labels to return (classifiers).")
    truncate: bool = Field(False, description="Cut over-long embedding inputs instead of 422.")
    stream: bool = Field(False, description="Answer as a stream of server-sent events.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0


class InferenceResponse(BaseModel):
    id: str
    model: str
    output: Any
    usage: Usage
    finish_reason: str | None = None


class LoadRequest(BaseModel):
    """`POST /v1/models/load`: a DifyModel spec with a name (camelCase or snake_case)."""

    model_config = ConfigDict(extra="allow")
    name: str | None = Field(None, description="Resource name; derived from modelId if absent.")


class UnloadRequest(_Body):
    name: str = Field(..., min_length=1, description="Name of the model to unload.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dify-mirror"
    task: str
    model_id: str
    phase: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    index: str | None = Field(None, description="Answer from this knowledge index (extension).")
    top_k: int = Field(4, ge=1, le=50, description="Chunks retrieved when `index` is given.")
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[str] = Field(...)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] = Field(...)
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = False


# ---- data ----------------------------------------------------------------------------
_ID = Field(..., min_length=1, max_length=512, description="Document id (unique per index).")


class CleanRequest(_Body):
    text: str = Field(..., min_length=1, description="Raw text or HTML.")
    index: str | None = Field(None, description="Use this index's cleaning rules and chunker.")
    rules: dict[str, Any] | None = Field(
        None, description="Cleaning rules (DifyIndex spec `cleaning`), when no index is named."
    )
    chunk: bool = Field(False, description="Also return the chunks (needs `index`).")


class EmbedRequest(_Body):
    model: str | None = Field(None, description="Embedding model; the first one if left out.")
    input: str | list[str] = Field(..., description="Text or texts to embed.")
    truncate: bool = Field(False, description="Cut inputs over the model's token limit.")


class Document(_Body):
    id: str = _ID
    text: str = Field(..., description="Raw text or HTML; cleaned and chunked on upsert.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Stored with each chunk.")
    subject_id: str | None = Field(
        None, max_length=512, description="The person the text is about (for erasure)."
    )


class UpsertRequest(_Body):
    index: str = Field(..., min_length=1, description="Index name.")
    documents: list[Document] = Field(..., description="Documents to add or replace.")


class SearchRequest(_Body):
    index: str = Field(..., min_length=1, description="Index name.")
    query: str | None = Field(None, min_length=1, description="Text to search for.")
    vector: list[float] | None = Field(None, description="Or a query vector of the index's size.")
    top_k: int = Field(10, ge=1, le=1000, description="Hits to return, 1..1000.")
    filter: dict[str, Any] | None = Field(
        None,
        description='Metadata filter: {"lang": "en"}, {"lang": ["en", "de"]}, '
        '{"year": {"gte": 2020}}; keys: document_id, subject_id, filterableFields.',
    )
    score_threshold: float | None = Field(None, description="Drop hits scoring below this.")


class DeleteRequest(_Body):
    index: str | None = Field(None, description="Index to delete documents from.")
    document_ids: list[str] | None = Field(None, description="Documents to delete.")
    subject_id: str | None = Field(
        None, min_length=1, description="Erase everything about this subject, in every index."
    )


class KnowledgeChatRequest(SamplingParams):
    model: str | None = Field(None, description="Generation model; the default if left out.")
    index: str = Field(..., min_length=1, description="Index to retrieve from.")
    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation.")
    top_k: int = Field(4, ge=1, le=50, description="Chunks to retrieve.")
    filter: dict[str, Any] | None = Field(None, description="Retrieval filter (as in search).")
    score_threshold: float | None = Field(None, description="Ignore chunks scoring below this.")
    stream: bool = Field(False, description="Answer as server-sent events.")
