from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TextRequest(_message.Message):
    __slots__ = ("model", "prompt", "input", "max_tokens", "temperature", "top_p", "seed", "top_k", "truncate", "stream")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    input: _containers.RepeatedScalarFieldContainer[str]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    top_k: int
    truncate: bool
    stream: bool
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., input: _Optional[_Iterable[str]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., top_k: _Optional[int] = ..., truncate: _Optional[bool] = ..., stream: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class TextResponse(_message.Message):
    __slots__ = ("id", "model", "output", "usage", "finish_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    output: _struct_pb2.Value
    usage: Usage
    finish_reason: str
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class TextChunk(_message.Message):
    __slots__ = ("id", "model", "delta", "index", "finish_reason", "usage")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    delta: str
    index: int
    finish_reason: str
    usage: Usage
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., delta: _Optional[str] = ..., index: _Optional[int] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "input", "truncate")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    input: _containers.RepeatedScalarFieldContainer[str]
    truncate: bool
    def __init__(self, model: _Optional[str] = ..., input: _Optional[_Iterable[str]] = ..., truncate: _Optional[bool] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedUsage(_message.Message):
    __slots__ = ("prompt_tokens",)
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "dimension", "data", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    dimension: int
    data: _containers.RepeatedCompositeFieldContainer[Vector]
    usage: EmbedUsage
    def __init__(self, model: _Optional[str] = ..., dimension: _Optional[int] = ..., data: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., usage: _Optional[_Union[EmbedUsage, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("index", "query", "vector", "top_k", "filter", "score_threshold")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    index: str
    query: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    filter: _struct_pb2.Struct
    score_threshold: float
    def __init__(self, index: _Optional[str] = ..., query: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., score_threshold: _Optional[float] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("document_id", "chunk_index", "text", "score", "metadata", "subject_id", "start", "end")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    chunk_index: int
    text: str
    score: float
    metadata: _struct_pb2.Struct
    subject_id: str
    start: int
    end: int
    def __init__(self, document_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., subject_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "query_tokens", "index", "took_ms")
    HITS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOOK_MS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    query_tokens: int
    index: str
    took_ms: float
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., query_tokens: _Optional[int] = ..., index: _Optional[str] = ..., took_ms: _Optional[float] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "text", "metadata", "subject_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _struct_pb2.Struct
    subject_id: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., subject_id: _Optional[str] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("index", "documents")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    ASYNC_FIELD_NUMBER: _ClassVar[int]
    index: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, index: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., **kwargs) -> None: ...

class UpsertedDocument(_message.Message):
    __slots__ = ("id", "chunks", "stale_chunks_removed")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STALE_CHUNKS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    id: str
    chunks: int
    stale_chunks_removed: int
    def __init__(self, id: _Optional[str] = ..., chunks: _Optional[int] = ..., stale_chunks_removed: _Optional[int] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("index", "erased", "documents", "chunks", "tokens", "task")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ERASED_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    index: str
    erased: _containers.RepeatedScalarFieldContainer[str]
    documents: _containers.RepeatedCompositeFieldContainer[UpsertedDocument]
    chunks: int
    tokens: int
    task: Task
    def __init__(self, index: _Optional[str] = ..., erased: _Optional[_Iterable[str]] = ..., documents: _Optional[_Iterable[_Union[UpsertedDocument, _Mapping]]] = ..., chunks: _Optional[int] = ..., tokens: _Optional[int] = ..., task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("index", "document_ids", "subject_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    index: str
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    subject_id: str
    def __init__(self, index: _Optional[str] = ..., document_ids: _Optional[_Iterable[str]] = ..., subject_id: _Optional[str] = ...) -> None: ...

class Removed(_message.Message):
    __slots__ = ("index", "points")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    index: str
    points: int
    def __init__(self, index: _Optional[str] = ..., points: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("receipt_id", "completed_at", "subject_id", "document_ids", "removed", "points_removed", "tasks_removed", "feedback_removed", "audit_text_shredded")
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    POINTS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    TASKS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_REMOVED_FIELD_NUMBER: _ClassVar[int]
    AUDIT_TEXT_SHREDDED_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    completed_at: str
    subject_id: str
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedCompositeFieldContainer[Removed]
    points_removed: int
    tasks_removed: int
    feedback_removed: int
    audit_text_shredded: int
    def __init__(self, receipt_id: _Optional[str] = ..., completed_at: _Optional[str] = ..., subject_id: _Optional[str] = ..., document_ids: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[_Union[Removed, _Mapping]]] = ..., points_removed: _Optional[int] = ..., tasks_removed: _Optional[int] = ..., feedback_removed: _Optional[int] = ..., audit_text_shredded: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("model", "prompt", "input", "max_tokens", "temperature", "top_p", "seed", "top_k", "truncate", "stream", "callback_url", "subject_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    input: _containers.RepeatedScalarFieldContainer[str]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    top_k: int
    truncate: bool
    stream: bool
    callback_url: str
    subject_id: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., input: _Optional[_Iterable[str]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., top_k: _Optional[int] = ..., truncate: _Optional[bool] = ..., stream: _Optional[bool] = ..., callback_url: _Optional[str] = ..., subject_id: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "object", "kind", "model", "status", "created_at", "started_at", "finished_at", "attempts", "queue_position", "output", "error", "usage", "progress", "expires_at")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    object: str
    kind: str
    model: str
    status: str
    created_at: float
    started_at: float
    finished_at: float
    attempts: int
    queue_position: int
    output: _struct_pb2.Value
    error: _struct_pb2.Struct
    usage: _struct_pb2.Struct
    progress: _struct_pb2.Struct
    expires_at: float
    def __init__(self, task_id: _Optional[str] = ..., object: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., status: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., attempts: _Optional[int] = ..., queue_position: _Optional[int] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., error: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., usage: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., progress: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., expires_at: _Optional[float] = ...) -> None: ...

class ModelStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "name", "memory_total_bytes", "memory_used_bytes", "utilization_percent")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., utilization_percent: _Optional[int] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("name", "weight", "phase", "ready_replicas", "message", "active_requests")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: int
    phase: str
    ready_replicas: int
    message: str
    active_requests: int
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[int] = ..., phase: _Optional[str] = ..., ready_replicas: _Optional[int] = ..., message: _Optional[str] = ..., active_requests: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "phase", "ready_replicas", "desired_replicas", "message", "load_progress", "reason", "scaled_to_zero", "needs", "free", "versions", "rollout", "model_id", "task", "device", "precision", "resident_memory_bytes", "parameters", "gpus", "engine", "engine_note", "active_requests", "running_requests", "waiting_requests", "hint", "last_cold_start_s")
    class NeedsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class FreeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LOAD_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCALED_TO_ZERO_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_NOTE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    LAST_COLD_START_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    phase: str
    ready_replicas: int
    desired_replicas: int
    message: str
    load_progress: float
    reason: str
    scaled_to_zero: bool
    needs: _containers.ScalarMap[str, float]
    free: _containers.ScalarMap[str, float]
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    rollout: _struct_pb2.Struct
    model_id: str
    task: str
    device: str
    precision: str
    resident_memory_bytes: int
    parameters: int
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    engine: str
    engine_note: str
    active_requests: int
    running_requests: int
    waiting_requests: int
    hint: str
    last_cold_start_s: float
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[str] = ..., ready_replicas: _Optional[int] = ..., desired_replicas: _Optional[int] = ..., message: _Optional[str] = ..., load_progress: _Optional[float] = ..., reason: _Optional[str] = ..., scaled_to_zero: _Optional[bool] = ..., needs: _Optional[_Mapping[str, float]] = ..., free: _Optional[_Mapping[str, float]] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ..., rollout: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., model_id: _Optional[str] = ..., task: _Optional[str] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., resident_memory_bytes: _Optional[int] = ..., parameters: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., engine: _Optional[str] = ..., engine_note: _Optional[str] = ..., active_requests: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., hint: _Optional[str] = ..., last_cold_start_s: _Optional[float] = ...) -> None: ...

class ModelStatusResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...
