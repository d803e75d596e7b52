"""Wire schemas of the gateway (requests and responses), apart from the routes.

Every field a client sends is bounded here, so a request over a bound is refused before
any replica is called. Two kinds of refusal:

- too much (characters of a text, texts to embed, total characters of a conversation,
  bytes of metadata or a filter): 413 `payload_too_large`, raised as the `too_large`
  validation error below; sending less, or splitting the request, helps.
- malformed (a name that is not a Kubernetes name, an id over 512 characters, a vector
  over 4096 dimensions, too many messages, ids or keys): 422 `invalid_request`.

Model and index names follow the Kubernetes name rule (`specs.ResourceName`), so a name
like `../x` is refused before any lookup or any Kubernetes API path is built from it.
The limits that operators tune (body size, documents per upsert, document size) are
options (`LimitOptions`) checked by the routes; the ones here are fixed by what the
engines and the calls between deployments can carry.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from dify_serving.specs import MODEL_REF_PATTERN, DifyIndexSpec, ResourceName, SwitchStrategy
from dify_serving.tasks.webhook import MAX_URL_CHARS

#: Characters of one prompt, one text to embed, or one conversation: about a 128k-token
#: context, and at most 2 MiB in UTF-8 (one call between deployments carries 4 MiB).
MAX_TEXT_CHARS = 512 * 1024
#: Characters of a search query: a model embeds at most a few hundred tokens of it.
MAX_QUERY_CHARS = 16 * 1024
#: Texts (or images) in one embedding or classification request: OpenAI's limit for
#: embeddings. Larger requests answer with tens of megabytes of JSON; split them.
MAX_INPUTS = 2048
#: Characters of one `/v1/inference` input: a base64 image of about 6 MB (texts are held
#: to MAX_TEXT_CHARS when they are embedded).
MAX_INPUT_CHARS = 8 * 1024 * 1024
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 64
MAX_DOCUMENT_IDS = 4096
ID_CHARS = 512
#: Largest query vector: the biggest common embedding models have 4096 dimensions.
MAX_VECTOR_DIMENSION = 4096
#: Metadata is stored with every chunk of a document, so it stays small.
MAX_METADATA_KEYS = 64
MAX_METADATA_BYTES = 8 * 1024
MAX_FILTER_KEYS = 32
MAX_FILTER_BYTES = 16 * 1024


def too_large(what: str, size: int, limit: int, unit: str = "characters") -> PydanticCustomError:
    """The validation error the gateway answers with 413 (see `errors.install`)."""
    return PydanticCustomError(
        "too_large",
        "{what}{size} {unit}; the limit is {limit}",
        {"what": what, "size": size, "unit": unit, "limit": limit},
    )


def _at_most(value: Any, limit: int, unit: str) -> Any:
    """A list over `limit` items is refused (413) before its items are validated."""
    if isinstance(value, list) and len(value) > limit:
        raise too_large("", len(value), limit, unit)
    return value


def _chars(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        if len(value) > limit:
            raise too_large("", len(value), limit)
        return value

    return AfterValidator(check)


def _texts(value: str | list[str], max_items: int, max_chars: int) -> str | list[str]:
    if isinstance(value, str):
        if len(value) > max_chars:
            raise too_large("", len(value), max_chars)
        return value
    if len(value) > max_items:
        raise too_large("", len(value), max_items, "items")
    for position, text in enumerate(value):
        if len(text) > max_chars:
            raise too_large(f"item {position} has ", len(text), max_chars)
    return value


def _json_bytes(value: dict[str, Any] | None, limit: int) -> dict[str, Any] | None:
    if value:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > limit:
            raise too_large("", size, limit, "bytes of JSON")
    return value


def message_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in a conversation (what the model will read)."""
    total = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content:
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def _conversation(messages: list[ChatMessage]) -> list[ChatMessage]:
    total = message_chars(messages)
    if total > MAX_TEXT_CHARS:
        raise too_large("", total, MAX_TEXT_CHARS, "characters in all")
    return messages


Name = ResourceName
#: A model a request names: `name`, or `name@version` to pin one of its versions.
ModelRef = Annotated[str, Field(min_length=1, max_length=127, pattern=MODEL_REF_PATTERN)]
Text = Annotated[str, Field(min_length=1), _chars(MAX_TEXT_CHARS)]
DocumentId = Annotated[str, Field(min_length=1, max_length=ID_CHARS)]
Filter = Annotated[
    dict[Annotated[str, Field(max_length=128)], Any],
    Field(max_length=MAX_FILTER_KEYS),
    AfterValidator(lambda v: _json_bytes(v, MAX_FILTER_BYTES)),
]
Options = Annotated[dict[Annotated[str, Field(max_length=64)], Any], Field(max_length=16)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParams(_Body):
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0, le=5, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass, (0, 1].")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling repeatable.")


class InferenceRequest(SamplingParams):
    model: ModelRef | None = Field(None, description="Model name; the default model if left out.")
    prompt: Text | None = Field(None, description="Text to continue (text-generation).")
    input: str | list[str] | None = Field(
        None,
        description=f"Inputs for other tasks: texts, or base64 images (at most {MAX_INPUTS}).",
    )
    top_k: int | None = Field(None, ge=1, le=1000, description="Labels to return (classifiers).")
    truncate: bool = Field(False, description="Cut over-long embedding inputs instead of 413.")
    stream: bool = Field(False, description="Answer as a stream of server-sent events.")

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str] | None) -> str | list[str] | None:
        return None if value is None else _texts(value, MAX_INPUTS, MAX_INPUT_CHARS)


class AsyncInferenceRequest(InferenceRequest):
    """`/v1/inference`'s body, run as a task; `stream` makes its partial output visible."""

    callback_url: str | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        description="POST the finished task here, signed (X-Dify-Signature: sha256=HMAC).",
    )
    subject_id: str | None = Field(
        None,
        min_length=1,
        max_length=ID_CHARS,
        description="Data subject the request is about: erasing the subject removes the task.",
    )


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


# ---- batch ----------------------------------------------------------------------------
#: Requests in one batch whatever the operator's limit (`LimitOptions.max_batch_requests`,
#: whose own upper bound this is): a longer list is refused before any item is validated.
MAX_BATCH_REQUESTS = 4096


class BatchItem(InferenceRequest):
    """One request of a batch: a `/v1/inference` body for the batch's model, answered whole."""

    model: ModelRef | None = Field(
        None, description="Leave out, or the batch's model: one batch is one model."
    )
    stream: bool = Field(False, description="Must be false: a batch answers whole.")

    @field_validator("stream")
    @classmethod
    def _whole(cls, value: bool) -> bool:
        if value:
            raise PydanticCustomError(
                "streamed_item", "a batch item does not stream; send one /v1/inference to stream"
            )
        return value


class BatchRequest(_Body):
    model: ModelRef | None = Field(
        None,
        description="The model of every item; the default model if neither it nor an item "
        "names one.",
    )
    requests: list[BatchItem] = Field(
        ...,
        min_length=1,
        max_length=MAX_BATCH_REQUESTS,
        description="`/v1/inference` bodies, answered in this order (at most "
        "DIFY_MIRROR_MAX_BATCH_REQUESTS, default 64).",
    )
    async_: bool = Field(
        False,
        alias="async",
        description="Run the batch as one task: 202 with its id; results by GET /v1/tasks/{id}",
    )

    @field_validator("requests", mode="before")
    @classmethod
    def _count(cls, value: Any) -> Any:
        return _at_most(value, MAX_BATCH_REQUESTS, "requests")

    @field_validator("requests")
    @classmethod
    def _one_model(cls, items: list[BatchItem], info: ValidationInfo) -> list[BatchItem]:
        wanted = info.data.get("model")
        for position, item in enumerate(items):
            if item.model is None:
                continue
            if wanted is None:
                wanted = item.model
            elif item.model != wanted:
                raise PydanticCustomError(
                    "one_model",
                    "item {position} names model '{named}', the batch '{wanted}'; one batch is "
                    "one model (send one batch per model)",
                    {"position": position, "named": item.model, "wanted": wanted},
                )
        return items

    def model_name(self) -> str | None:
        """The batch's model: its own `model`, else the one its items name (if any)."""
        return self.model or next((i.model for i in self.requests if i.model), None)


class BatchItemError(BaseModel):
    code: str
    message: str


class BatchItemOk(BaseModel):
    index: int = Field(..., description="The item's position in `requests`.")
    status: Literal["ok"] = "ok"
    output: Any
    usage: Usage
    finish_reason: str | None = None


class BatchItemFailed(BaseModel):
    index: int = Field(..., description="The item's position in `requests`.")
    status: Literal["error"] = "error"
    error: BatchItemError


#: One item's answer: what `/v1/inference` would answer, or the error it would get.
BatchResult = Annotated[BatchItemOk | BatchItemFailed, Field(discriminator="status")]


class BatchResponse(BaseModel):
    id: str
    model: str
    results: list[BatchResult] = Field(..., description="One per request, in their order.")
    usage: Usage = Field(..., description="The items' usage summed.")


class LoadRequest(BaseModel):
    """`POST /v1/models/load`: a DifyModel spec with a name (camelCase or snake_case)."""

    model_config = ConfigDict(extra="allow")
    name: Name | None = Field(None, description="Resource name; derived from modelId if absent.")


class SwitchRequest(_Body):
    version: Name = Field(..., description="The version to move traffic to.")
    strategy: SwitchStrategy = Field(
        SwitchStrategy.BLUE_GREEN,
        description="blue-green: all traffic once it is Ready, then the old retires; "
        "canary: `weight` percent of it, the rest stays.",
    )
    weight: int | None = Field(
        None, ge=1, le=100, description="The canary's share in percent (canary only)."
    )


class UnloadRequest(_Body):
    name: Name = Field(..., description="Name of the model to unload.")


class CreateIndexRequest(DifyIndexSpec):
    """`POST /v1/indexes`: a DifyIndex spec (camelCase or snake_case) with its name.

    The spec's own validation, unknown keys refused; every field is bounded there. The
    name becomes a Kubernetes object name, a Serve app name and the default collection
    (a folder), so it is an RFC 1123 label.
    """

    name: Name = Field(..., description="Index name (lower-case RFC 1123, at most 63 chars).")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dify-mirror"
    task: str
    model_id: str | None  # None: a local path, shown to admin keys only
    phase: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    #: OpenAI's roles; a chat template knows no others (`function` is its legacy `tool`).
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)] | None = (
        None
    )


Messages = Annotated[
    list[ChatMessage],
    Field(min_length=1, max_length=MAX_MESSAGES),
    AfterValidator(_conversation),
]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: ModelRef | None = None
    index: Name | None = Field(None, description="Answer from this knowledge index (extension).")
    top_k: int = Field(4, ge=1, le=50, description="Chunks retrieved when `index` is given.")
    messages: Messages
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Options | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: ModelRef | None = None
    prompt: str | list[str] = Field(...)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Options | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            return value  # the route says: one prompt per request
        return _texts(value, 1, MAX_TEXT_CHARS)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: ModelRef | None = None
    input: str | list[str] = Field(..., description=f"Text or texts (at most {MAX_INPUTS}).")
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = False

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        return _texts(value, MAX_INPUTS, MAX_TEXT_CHARS)


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class Citation(BaseModel):
    """A retrieved chunk the answer was given (`index` extension), numbered as cited."""

    ref: int
    document_id: str
    chunk_index: int
    score: float
    text: str
    metadata: dict[str, Any] = {}


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    citations: list[Citation] | None = Field(None, exclude_if=lambda value: value is None)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


# ---- data ----------------------------------------------------------------------------
class CleanRequest(_Body):
    text: str = Field(..., min_length=1, description="Raw text or HTML (an upsert's limits).")
    index: Name | None = Field(None, description="Use this index's cleaning rules and chunker.")
    rules: Options | None = Field(
        None, description="Cleaning rules (DifyIndex spec `cleaning`), when no index is named."
    )
    chunk: bool = Field(False, description="Also return the chunks (needs `index`).")


class EmbedRequest(_Body):
    model: ModelRef | None = Field(None, description="Embedding model; the first one if left out.")
    input: str | list[str] = Field(
        ..., description=f"Text or texts to embed (at most {MAX_INPUTS})."
    )
    truncate: bool = Field(False, description="Cut inputs over the model's token limit.")

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        return _texts(value, MAX_INPUTS, MAX_TEXT_CHARS)


Metadata = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=128)], Any],
    Field(max_length=MAX_METADATA_KEYS),
    AfterValidator(lambda v: _json_bytes(v, MAX_METADATA_BYTES)),
]


class Document(_Body):
    id: DocumentId = Field(..., description="Document id (unique per index).")
    text: str = Field(..., description="Raw text or HTML; cleaned and chunked on upsert.")
    metadata: Metadata = Field(
        default_factory=dict,
        description=f"Stored with each chunk (at most {MAX_METADATA_KEYS} keys, "
        f"{MAX_METADATA_BYTES} bytes of JSON).",
    )
    subject_id: str | None = Field(
        None, min_length=1, max_length=ID_CHARS, description="The person the text is about."
    )


#: Documents one bulk ingestion task takes (its request body bounds it too).
MAX_BULK_DOCUMENTS = 100_000


class UpsertRequest(_Body):
    index: Name = Field(..., description="Index name.")
    documents: list[Document] = Field(
        ...,
        max_length=MAX_BULK_DOCUMENTS,
        description="Documents to add or replace: DIFY_MIRROR_MAX_DOCUMENTS at once, up to "
        f"{MAX_BULK_DOCUMENTS} as a task.",
    )
    async_: bool = Field(
        False,
        alias="async",
        description="Ingest as a task (202; progress by GET /v1/tasks/{id}); also when there "
        "are more documents than one request takes.",
    )

    @field_validator("documents", mode="before")
    @classmethod
    def _count(cls, value: Any) -> Any:
        return _at_most(value, MAX_BULK_DOCUMENTS, "documents")


class SearchRequest(_Body):
    index: Name = Field(..., description="Index name.")
    query: Annotated[str, Field(min_length=1), _chars(MAX_QUERY_CHARS)] | None = Field(
        None, description="Text to search for."
    )
    vector: list[float] | None = Field(
        None,
        min_length=1,
        max_length=MAX_VECTOR_DIMENSION,
        description="Or a query vector of the index's size.",
    )
    top_k: int = Field(10, ge=1, le=1000, description="Hits to return, 1..1000.")
    filter: Filter | None = Field(
        None,
        description='Metadata filter: {"lang": "en"}, {"lang": ["en", "de"]}, '
        '{"year": {"gte": 2020}}; keys: document_id, subject_id, filterableFields.',
    )
    score_threshold: float | None = Field(None, description="Drop hits scoring below this.")


class DeleteRequest(_Body):
    index: Name | None = Field(None, description="Index to delete documents from.")
    document_ids: list[DocumentId] | None = Field(
        None, max_length=MAX_DOCUMENT_IDS, description="Documents to delete."
    )
    subject_id: str | None = Field(
        None,
        min_length=1,
        max_length=ID_CHARS,
        description="Erase everything about this subject, in every index.",
    )


class KnowledgeChatRequest(SamplingParams):
    model: ModelRef | None = Field(None, description="Generation model; the default if left out.")
    index: Name = Field(..., description="Index to retrieve from.")
    messages: Messages = Field(..., description="The conversation.")
    top_k: int = Field(4, ge=1, le=50, description="Chunks to retrieve.")
    filter: Filter | None = Field(None, description="Retrieval filter (as in search).")
    score_threshold: float | None = Field(None, description="Ignore chunks scoring below this.")
    stream: bool = Field(False, description="Answer as server-sent events.")
