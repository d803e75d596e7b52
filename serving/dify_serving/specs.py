"""Specs of the custom resources: the single source of truth.

`DifyModelSpec` and `DifyIndexSpec` validate three things at once: the CRD schema
(generated from them by `dify_serving.crdgen`), the manifests given to
`dify-mirror serve -f`, and the bodies of `POST /v1/models/load`. Keys are camelCase on
the wire, as Kubernetes users expect, and snake_case is accepted too.

This module imports nothing heavy (no torch, transformers or ray): the operator uses it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "difymirror.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: RFC 1123 label: what Kubernetes accepts as an object name and we use in app names.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)

ResourceName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        pattern=NAME_PATTERN,
        description="Lower-case RFC 1123 name (letters, digits, '-'), at most 63 characters.",
    ),
]

#: A modelId that is not a hub id or builtin:NAME is an absolute path on the replicas.
#: Only absolute: `./x` or `~/x` would mean one folder to the gateway that checks it and
#: another to the replica that loads it (another working directory, another user).
LOCAL_PREFIX = "/"
_HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
#: The CRD's modelId pattern; the validator below says in words what is wrong.
MODEL_ID_PATTERN = rf"^(builtin:[a-z0-9]([-a-z0-9]*[a-z0-9])?|/[^\s]*|{_HUB_ID})$"
_HUB_ID_RE = re.compile(_HUB_ID)
#: Hub revisions are git refs or commits; they become paths in the local cache.
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
_REVISION_RE = re.compile(REVISION_PATTERN)
URL_PATTERN = r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^\s?#@]*)?$"
#: The port qdrant-client uses when a URL names none (whatever the scheme).
QDRANT_DEFAULT_PORT = 6333
#: A model reference in a request: a name, or `name@version` to pin one version.
MODEL_REF_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(@[a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"


def is_name(value: str) -> bool:
    """Whether `value` is a lower-case RFC 1123 label (a safe path or URL segment)."""
    return len(value) <= 63 and _NAME_RE.fullmatch(value) is not None


def is_local_model_id(model_id: str) -> bool:
    """Whether a modelId names a folder on this machine (else a hub id or builtin:)."""
    return model_id.startswith(LOCAL_PREFIX)


def check_http_url(value: str, what: str = "store.url") -> str:
    """`value` if it is a plain http(s) URL: no credentials, query or fragment, a valid port.

    Every Qdrant URL goes through here (a spec's `store.url`, `DIFY_MIRROR_QDRANT_URL`):
    the index replica and the operator fetch it, so nothing else may reach them.
    """
    parts = urlsplit(value)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or past 65535
        port_ok = False
    if not port_ok or not parts.hostname or re.fullmatch(URL_PATTERN, value) is None:
        raise ValueError(
            f"{what} must be an http(s) URL without credentials, query or fragment, "
            "e.g. http://qdrant:6333"
        )
    return value


def qdrant_server(url: str) -> str:
    """The server a Qdrant URL reaches, as qdrant-client reads it: scheme, lower-case host,
    port (6333 when none is written) and path prefix. Equal strings: one server."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port = parts.port or QDRANT_DEFAULT_PORT
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def check_model_id(value: str) -> str:
    """A modelId is builtin:NAME, a path (checked against the model roots where used) or a
    hub id; a hub id never doubles as a relative path, which `from_pretrained` would read."""
    if value != value.strip() or any(c.isspace() for c in value):
        raise ValueError("modelId must not contain whitespace")
    if "\x00" in value:
        raise ValueError("modelId must not contain NUL")
    if value.startswith("builtin:"):
        if not is_name(value.removeprefix("builtin:")):
            raise ValueError("modelId builtin:NAME needs a lower-case RFC 1123 NAME")
    elif not is_local_model_id(value) and (
        len(value) > 96 or ".." in value or not _HUB_ID_RE.fullmatch(value)
    ):
        raise ValueError(
            "modelId must be a hub id (org/name: letters, digits, '.', '_', '-'; at most "
            "96 characters, no '..'), an absolute path, or builtin:NAME"
        )
    return value


def check_revision(value: str | None) -> str | None:
    if value is not None and (".." in value or not _REVISION_RE.fullmatch(value)):
        raise ValueError(
            "revision must be a branch, tag or commit (letters, digits, '.', '_', '-', '/'; "
            "no '..')"
        )
    return value


ModelId = Annotated[
    str,
    Field(min_length=1, max_length=1024, json_schema_extra={"pattern": MODEL_ID_PATTERN}),
    AfterValidator(check_model_id),
]
Revision = Annotated[
    str | None,
    Field(max_length=128, json_schema_extra={"pattern": REVISION_PATTERN}),
    AfterValidator(check_revision),
]


class Task(StrEnum):
    TEXT_GENERATION = "text-generation"
    FEATURE_EXTRACTION = "feature-extraction"
    TEXT_CLASSIFICATION = "text-classification"
    IMAGE_CLASSIFICATION = "image-classification"
    IMAGE_TO_TEXT = "image-to-text"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # text generation on CTranslate2, where it agrees with fp32 (checked)


class Runtime(StrEnum):
    """What runs a model's forward pass (`spec.engine`)."""

    AUTO = "auto"  # the fastest one installed for the task, device and precision
    TORCH = "torch"
    OPENVINO = "openvino"
    CTRANSLATE2 = "ctranslate2"
    VLLM = "vllm"


#: Tasks each runtime other than torch serves (torch serves every task).
RUNTIME_TASKS = {
    Runtime.OPENVINO: frozenset(
        {Task.FEATURE_EXTRACTION, Task.TEXT_CLASSIFICATION, Task.TEXT_GENERATION}
    ),
    Runtime.CTRANSLATE2: frozenset({Task.TEXT_GENERATION}),
    Runtime.VLLM: frozenset({Task.TEXT_GENERATION}),
}
#: The pip extra that installs each runtime other than torch (its import name too).
RUNTIME_EXTRAS = {
    Runtime.OPENVINO: "openvino",
    Runtime.CTRANSLATE2: "ctranslate2",
    Runtime.VLLM: "vllm",
}
#: Devices each runtime other than torch serves here ("cuda" covers cuda:N).
RUNTIME_DEVICES = {
    Runtime.OPENVINO: ("cpu",),
    Runtime.CTRANSLATE2: ("cpu",),
    Runtime.VLLM: ("cuda",),
}
#: Precisions each runtime other than torch runs (CTranslate2 has no bf16 kernels on CPU).
RUNTIME_PRECISIONS = {
    Runtime.OPENVINO: (Precision.FP32, Precision.BF16),
    Runtime.CTRANSLATE2: (Precision.FP32, Precision.INT8),
}


class Phase(StrEnum):
    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class _Spec(BaseModel):
    """camelCase on the wire, snake_case accepted; unknown keys are an error."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase dict, without unset defaults that are None."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Resources(_Spec):
    cpus: float = Field(
        1.0,
        ge=0,
        le=256,
        description="CPUs per replica; also the number of math threads the replica pins.",
    )
    gpus: float = Field(
        0.0, ge=0, le=16, description="GPUs per replica (set automatically to 1 for cuda)."
    )
    memory: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        description="Memory per replica as a Kubernetes quantity, e.g. 4Gi.",
    )


def _min_not_over_max(low: int, high: int) -> None:
    if low > high:
        raise ValueError(f"minReplicas ({low}) must not exceed maxReplicas ({high})")


class Autoscaling(_Spec):
    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas (0 scales to zero).")
    max_replicas: int = Field(1, ge=1, le=1000, description="Most replicas.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ongoing requests per replica the autoscaler aims at."
    )
    idle_timeout_s: float | None = Field(
        None,
        ge=0,
        le=86400,
        description="Seconds without traffic before a replica is stopped (to zero with "
        "minReplicas 0; the first request then wakes it); default Ray Serve's 600.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        _min_not_over_max(self.min_replicas, self.max_replicas)
        return self


class Generation(_Spec):
    max_new_tokens: int = Field(
        128, ge=1, le=32768, description="Default and upper limit of tokens generated per request."
    )
    temperature: float = Field(1.0, ge=0, le=5, description="Default sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Default nucleus sampling mass.")
    max_context_tokens: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description="Longest prompt plus completion; defaults to the model's own limit.",
    )


class Batching(_Spec):
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="Most requests in one batch (embeddings, pipelines)."
    )
    batch_wait_timeout_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a partial batch waits for more requests."
    )
    max_concurrent_requests: int = Field(
        64, ge=1, le=4096, description="Most requests in flight per replica before queueing."
    )


class ModelVersion(_Spec):
    """One revision of a model; the model's other fields (task, device, engine …) apply."""

    name: ResourceName
    model_id: ModelId = Field(..., description="Hub id or local path of this version.")
    revision: Revision = Field(None, description="Hub revision (branch, tag or commit).")
    weight: int = Field(
        0,
        ge=0,
        le=100,
        description="Share of traffic in percent; the weights of all versions sum to 100. "
        "A version at 0 is declared but not loaded (a switch loads it).",
    )


class SwitchStrategy(StrEnum):
    BLUE_GREEN = "blue-green"
    CANARY = "canary"


class RolloutPhase(StrEnum):
    LOADING = "Loading"  # the target's versions load beside the serving ones
    DRAINING = "Draining"  # traffic moved; retired versions finish what they hold
    COMPLETE = "Complete"
    FAILED = "Failed"  # a target version failed to load: traffic never moved


VersionWeights = Annotated[
    dict[
        Annotated[str, Field(max_length=63, pattern=NAME_PATTERN)],
        Annotated[int, Field(ge=0, le=100)],
    ],
    Field(max_length=16),
]


class Rollout(_Spec):
    """A switch between versions, moved on by the gateway (one machine) or written by
    it into the DifyModel (cluster): load the target beside the serving versions, wait
    until Ready, move the weights, let the retired ones drain, drop them."""

    strategy: SwitchStrategy = Field(SwitchStrategy.BLUE_GREEN, description="blue-green or canary.")
    target: VersionWeights = Field(..., description="The weights to move to, by version.")
    previous: VersionWeights = Field(
        default_factory=dict, description="The weights before this switch (rollback's target)."
    )
    phase: RolloutPhase = Field(RolloutPhase.LOADING, description="Where the switch stands.")
    draining: list[Annotated[str, Field(max_length=63, pattern=NAME_PATTERN)]] = Field(
        default_factory=list, max_length=16, description="Versions that lost their traffic."
    )
    changed_at: float | None = Field(None, description="When the phase last changed (epoch s).")
    message: str | None = Field(None, max_length=1000, description="Why it is in its phase.")

    @property
    def running(self) -> bool:
        return self.phase in (RolloutPhase.LOADING, RolloutPhase.DRAINING)


def _check_weights(weights: dict[str, int], what: str) -> None:
    if weights and sum(weights.values()) != 100:
        listed = ", ".join(f"{name}={weight}" for name, weight in weights.items())
        raise ValueError(f"{what}: weights {listed} sum to {sum(weights.values())}, not 100")


class AsyncInference(_Spec):
    """Consumers of this model's own task queue, scaled on its depth (Ray Serve's
    `AsyncInferenceAutoscalingPolicy`). Without it, the model's tasks share one queue."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest consumers (0 scales to zero).")
    max_replicas: int = Field(1, ge=1, le=1000, description="Most consumers.")
    target_queue_length: int = Field(
        16, ge=1, le=100_000, description="Queued and running tasks per consumer aimed at."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AsyncInference:
        _min_not_over_max(self.min_replicas, self.max_replicas)
        return self


class DifyModelSpec(_Spec):
    """A model to serve: what to load, on what device, how many replicas."""

    model_id: ModelId = Field(
        ...,
        description=(
            "Hub id (e.g. sentence-transformers/all-MiniLM-L6-v2), absolute path under the "
            "model roots, or builtin:NAME for a model the platform builds itself "
            "(builtin:demo-llm)."
        ),
    )
    task: Task = Field(Task.TEXT_GENERATION, description="What the model does; chooses the engine.")
    revision: Revision = Field(None, description="Hub revision (branch, tag or commit).")
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda(:[0-9]+)?)$",
        description="cpu, cuda or cuda:N. cuda asks Ray for a GPU per replica.",
    )
    precision: Precision = Field(
        Precision.FP32,
        description="Weights dtype: fp32, fp16 (GPU only), bf16, or int8 (text-generation "
        "on CPU; served only where its greedy tokens agree with fp32's ≥ 98%, else fp32).",
    )
    engine: Runtime = Field(
        Runtime.AUTO,
        description="What runs the model: auto (the fastest installed for the task, device "
        "and precision; the status says which), torch (every task and device), openvino "
        "(feature-extraction, text-classification and text-generation on CPU), ctranslate2 "
        "(text-generation on CPU, fp32 or int8) or vllm (text-generation on CUDA). openvino "
        "and ctranslate2 convert the model at load and cache it under the state folder.",
    )
    replicas: int = Field(1, ge=0, le=1000, description="Fixed replica count (no autoscaling).")
    autoscaling: Autoscaling | None = Field(
        None, description="Autoscaling bounds; replaces replicas when set."
    )
    async_inference: AsyncInference | None = Field(
        None,
        description="Task consumers of this model's own queue, autoscaled on its depth; "
        "unset: its async tasks go to the shared queue.",
    )
    resources: Resources = Field(
        default_factory=Resources,  # type: ignore[arg-type]
        description="Resources per replica.",
    )
    generation: Generation = Field(
        default_factory=Generation,  # type: ignore[arg-type]
        description="Generation defaults and limits (text-generation, image-to-text).",
    )
    batching: Batching = Field(
        default_factory=Batching,  # type: ignore[arg-type]
        description="Batching limits.",
    )
    versions: list[ModelVersion] = Field(
        default_factory=list,
        max_length=16,
        description="Revisions of this model and their traffic weights (sum 100); each "
        "version with weight > 0 is served by its own replicas. Empty: the model is served "
        "from modelId/revision alone. POST /v1/models/{name}/switch moves the weights "
        "without dropping a request.",
    )
    rollout: Rollout | None = Field(
        None, description="The last switch between versions (written by the gateway)."
    )

    @field_validator("versions")
    @classmethod
    def _versions(cls, value: list[ModelVersion]) -> list[ModelVersion]:
        names = [v.name for v in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"version names must be unique: {', '.join(twice)} repeated")
        _check_weights({v.name: v.weight for v in value}, "versions")
        return value

    @model_validator(mode="after")
    def _rollout(self) -> DifyModelSpec:
        if self.rollout is None:
            return self
        if not self.versions:
            raise ValueError("rollout: the model has no versions")
        known = {v.name for v in self.versions}
        for what, weights in (("target", self.rollout.target), ("previous", self.rollout.previous)):
            unknown = sorted(set(weights) - known)
            if unknown:
                raise ValueError(f"rollout.{what}: unknown versions {', '.join(unknown)}")
            _check_weights(weights, f"rollout.{what}")
        return self

    def weights(self) -> dict[str, int]:
        """The traffic each version carries now, by name (empty: no versions)."""
        return {v.name: v.weight for v in self.versions}

    def version(self, name: str) -> ModelVersion | None:
        return next((v for v in self.versions if v.name == name), None)

    def for_version(self, name: str) -> DifyModelSpec:
        """The spec one version's replicas run: its weights, the model's other fields."""
        version = self.version(name)
        if version is None:
            raise KeyError(name)
        return self.model_copy(
            update={
                "model_id": version.model_id,
                "revision": version.revision,
                "versions": [],
                "rollout": None,
            }
        )

    @model_validator(mode="after")
    def _precision(self) -> DifyModelSpec:
        if self.precision == Precision.FP16 and not self.device.startswith("cuda"):
            raise ValueError("precision fp16 needs a GPU (device cuda); on CPU use bf16 or fp32")
        if self.precision == Precision.INT8 and (
            self.task != Task.TEXT_GENERATION
            or self.uses_cuda
            or self.engine not in (Runtime.AUTO, Runtime.CTRANSLATE2)
        ):
            raise ValueError(
                "precision int8 is offered for text-generation on CPU (engine auto or "
                "ctranslate2), where its agreement with fp32 is checked at load"
            )
        tasks = RUNTIME_TASKS.get(self.engine)
        if tasks is not None and self.task not in tasks:
            raise ValueError(
                f"engine {self.engine} serves {', '.join(sorted(tasks))}, not {self.task}; "
                "use engine torch or auto"
            )
        devices = RUNTIME_DEVICES.get(self.engine)
        if devices is not None and self.device.partition(":")[0] not in devices:
            raise ValueError(
                f"engine {self.engine} serves device {' or '.join(devices)}, not "
                f"{self.device}; use engine auto or torch"
            )
        precisions = RUNTIME_PRECISIONS.get(self.engine)
        if precisions is not None and self.precision not in precisions:
            raise ValueError(
                f"engine {self.engine} runs precision {', '.join(precisions)} here, not "
                f"{self.precision}; use engine auto or torch"
            )
        return self

    @property
    def uses_cuda(self) -> bool:
        return self.device.startswith("cuda")


class VersionStatus(_Spec):
    name: str = Field(..., description="The version.")
    weight: int = Field(0, description="Its share of traffic now, in percent.")
    phase: Phase | None = Field(None, description="Its phase; none when it is not loaded.")
    ready_replicas: int | None = Field(None, description="Its replicas serving requests.")


class DifyModelStatus(_Spec):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    phase: Phase = Field(Phase.PENDING, description="Pending, Loading, Ready, Degraded, Failed.")
    ready_replicas: int = Field(0, ge=0, description="Replicas serving requests.")
    endpoint: str | None = Field(None, description="Where the model answers.")
    observed_generation: int | None = Field(None, description="Spec generation last acted on.")
    message: str | None = Field(None, description="Why the object is in its phase.")
    reason: str | None = Field(
        None, description="A short code for the phase when it needs one (Unschedulable)."
    )
    load_progress: float | None = Field(None, ge=0, le=1, description="Loading progress, 0..1.")
    conditions: list[dict[str, Any]] = Field(
        default_factory=list, description="Kubernetes-style conditions (Ready, Reconciled)."
    )
    versions: list[VersionStatus] = Field(
        default_factory=list, description="Each version: its weight, phase and replicas."
    )


class Chunking(_Spec):
    max_tokens: int = Field(
        512, ge=16, le=512, description="Largest chunk in embedding-tokenizer tokens (≤ 512)."
    )
    overlap: int = Field(64, ge=0, le=256, description="Tokens shared by neighbouring chunks.")

    @model_validator(mode="after")
    def _overlap(self) -> Chunking:
        if self.overlap >= self.max_tokens:
            raise ValueError(
                f"overlap ({self.overlap}) must be smaller than maxTokens ({self.max_tokens})"
            )
        return self


class Cleaning(_Spec):
    strip_html: bool = Field(True, description="Turn HTML into text.")
    normalize_unicode: bool = Field(True, description="Normalise to NFC.")
    collapse_whitespace: bool = Field(True, description="Collapse runs of whitespace.")
    drop_control_chars: bool = Field(True, description="Drop control characters.")
    remove_urls: bool = Field(False, description="Remove URLs.")
    remove_emails: bool = Field(False, description="Remove e-mail addresses.")
    deduplicate: bool = Field(True, description="Drop chunks whose text repeats exactly.")


class Hnsw(_Spec):
    m: int = Field(16, ge=4, le=128, description="Edges per node.")
    ef_construct: int = Field(100, ge=8, le=4096, description="Build-time search width.")
    ef: int = Field(
        128, ge=8, le=4096, description="Search-time width (hnsw_ef): higher is more exact."
    )


class Quantization(_Spec):
    scalar: bool = Field(False, description="int8 scalar quantization of stored vectors.")
    always_ram: bool = Field(True, description="Keep quantized vectors in RAM.")


class VectorStore(_Spec):
    type: Literal["embedded", "qdrant"] = Field(
        "embedded", description="embedded (Qdrant Edge on disk) or qdrant (a Qdrant server)."
    )
    url: str | None = Field(
        None,
        max_length=2048,
        json_schema_extra={"pattern": URL_PATTERN},
        description="Qdrant server URL (http or https) when type is qdrant.",
    )
    collection: ResourceName | None = Field(
        None,
        description="Collection name (lower-case RFC 1123, at most 63 characters); "
        "defaults to the index name. Two indexes may not share one.",
    )
    distance: Literal["Cosine", "Dot", "Euclid"] = Field("Cosine", description="Metric.")
    hnsw: Hnsw = Field(default_factory=Hnsw, description="HNSW index parameters.")  # type: ignore[arg-type]
    quantization: Quantization | None = Field(None, description="Optional quantization.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @model_validator(mode="after")
    def _url(self) -> VectorStore:
        if self.type == "qdrant" and not self.url:
            raise ValueError("store.url is required when store.type is qdrant")
        return self


class DifyIndexSpec(_Spec):
    """A knowledge index: an embedding model, how to cut text, where vectors live."""

    embedding_model: ResourceName = Field(
        ..., description="Name of the DifyModel (task feature-extraction) that embeds."
    )
    chunking: Chunking = Field(default_factory=Chunking, description="How text is cut.")  # type: ignore[arg-type]
    cleaning: Cleaning = Field(default_factory=Cleaning, description="How text is cleaned.")  # type: ignore[arg-type]
    store: VectorStore = Field(
        default_factory=VectorStore,  # type: ignore[arg-type]
        description="Where the vectors live.",
    )
    filterable_fields: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=64,
        description="Metadata keys that get a payload index and filters.",
    )
    reclaim_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="On deletion: keep (Retain) or drop (Delete) the vectors."
    )


def store_address(spec: DifyIndexSpec, qdrant_url: str | None = None) -> str | None:
    """The Qdrant server URL an index opens, or None for a shard on the replica's disk.

    `store.type: qdrant` uses its `store.url`; an embedded index goes to the `qdrant_url`
    setting (`DIFY_MIRROR_QDRANT_URL`) when one is set. `open_backend`, the collection clash
    check and reclaim all follow this one rule.
    """
    if spec.store.type == "qdrant":
        return spec.store.url
    return qdrant_url or None


def store_key(
    index_name: str, spec: DifyIndexSpec, qdrant_url: str | None = None
) -> tuple[str, ...]:
    """What identifies an index's vectors: its collection on this machine's embedded
    store, or the collection on the Qdrant server it really opens (`store_address`)."""
    collection = spec.store.collection or index_name
    url = store_address(spec, qdrant_url)
    if not url:
        return ("embedded", collection)
    return ("qdrant", qdrant_server(url), collection)


def shared_collections(
    indexes: Iterable[tuple[str, DifyIndexSpec]], qdrant_url: str | None = None
) -> dict[str, str]:
    """Index → the index (first by name) whose collection it would share.

    Two indexes on one collection would write each other's chunks, and deleting one with
    `reclaimPolicy: Delete` would drop the other's vectors; the later one by name loses.
    `qdrant_url` is the deployment's setting: embedded indexes then live on that server.
    """
    owners: dict[tuple[str, ...], str] = {}
    clashes: dict[str, str] = {}
    for name, spec in sorted(indexes, key=lambda pair: pair[0]):
        owner = owners.setdefault(store_key(name, spec, qdrant_url), name)
        if owner != name:
            clashes[name] = owner
    return clashes


def shared_collection_message(name: str, owner: str, spec: DifyIndexSpec) -> str:
    collection = spec.store.collection or name
    return (
        f"store.collection: index {name!r} would share collection {collection!r} with index "
        f"{owner!r}; give it its own store.collection"
    )


class DifyIndexStatus(DifyModelStatus):
    points: int | None = Field(None, ge=0, description="Chunks stored.")


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: ResourceName
    namespace: str | None = None
    generation: int | None = None


class DifyModel(BaseModel):
    """A whole `DifyModel` object as found in a manifest or the Kubernetes API."""

    model_config = ConfigDict(extra="ignore")
    api_version: Literal["difymirror.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")  # type: ignore[arg-type]
    kind: Literal["DifyModel"] = "DifyModel"
    metadata: ObjectMeta
    spec: DifyModelSpec

    #: The version a request was given (`GatewayState.model`); None: unversioned.
    _version: str | None = PrivateAttr(None)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str | None:
        return self._version

    @property
    def target(self) -> str:
        """What serves a request: `name`, or `name@version` for a versioned model."""
        return self.name if self._version is None else f"{self.name}@{self._version}"

    def at_version(self, version: str) -> DifyModel:
        """This model as one of its versions serves it (the version's weights and id)."""
        served = self.model_copy(update={"spec": self.spec.for_version(version)})
        served._version = version
        return served


class DifyIndex(BaseModel):
    model_config = ConfigDict(extra="ignore")
    api_version: Literal["difymirror.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")  # type: ignore[arg-type]
    kind: Literal["DifyIndex"] = "DifyIndex"
    metadata: ObjectMeta
    spec: DifyIndexSpec

    @property
    def name(self) -> str:
        return self.metadata.name


def name_from_model_id(model_id: str) -> str:
    """Derive a resource name from a model id: `ernie-3.5-turbo` → `ernie-3-5-turbo`."""
    tail = model_id.rstrip("/").rsplit("/", 1)[-1].split(":")[-1]
    name = re.sub(r"[^a-z0-9]+", "-", tail.lower()).strip("-")[:63].strip("-")
    if not name or not _NAME_RE.match(name):
        raise ValueError(f"cannot derive a resource name from modelId {model_id!r}; give a name")
    return name
