"""dify.proto against the REST API it mirrors, and against buf's lint rules.

The messages are written by hand beside the pydantic models, so nothing but these tests
keeps the two in step: a field added to a REST body and not to its message is silently
dropped by gRPC clients (the codec converts by name). The request bodies are compared
as schemas (names, types, presence); the answers the gateway builds as plain dicts are
compared as data, each converted strictly, so a key the code writes without a field in
the message fails here. The committed stubs are regenerated and compared byte for byte,
and the field numbers are held against a snapshot, so a renumbered field (which breaks
every deployed client) fails too.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tomllib
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace, UnionType
from typing import Annotated, Any, Union, cast, get_args, get_origin

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel

from dify_serving.engines.protocol import GenerationDelta
from dify_serving.gateway import schemas
from dify_serving.gateway.dataplane import data, inference, models
from dify_serving.grpc import dify_pb2 as pb
from dify_serving.grpc.codec import from_dict, to_dict
from dify_serving.render import model_app_name
from dify_serving.rollout import start, switch_target
from dify_serving.specs import DifyModel, DifyModelSpec, ObjectMeta, SwitchStrategy
from dify_serving.status import model_status
from dify_serving.tasks import store
from dify_serving.tasks.runner import task_view

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(pb.__file__).parent
PROTO = STUBS / "dify.proto"

# ---- 1. request and response bodies: the same fields, compatible types ----------------
#: (message, REST model): every field of one is a field of the other.
PAIRS: list[tuple[type[Message], type[BaseModel]]] = [
    (pb.TextRequest, schemas.InferenceRequest),
    (pb.TaskRequest, schemas.AsyncInferenceRequest),
    (pb.TextResponse, schemas.InferenceResponse),
    (pb.Usage, schemas.Usage),
    (pb.EmbedRequest, schemas.EmbedRequest),
    (pb.SearchRequest, schemas.SearchRequest),
    (pb.UpsertRequest, schemas.UpsertRequest),
    (pb.Document, schemas.Document),
    (pb.DeleteRequest, schemas.DeleteRequest),
]
PAIRED = {rest: message.DESCRIPTOR.full_name for message, rest in PAIRS}

#: REST type (Annotated, Optional stripped) -> the proto types that carry it. A string
#: or a list is the list (the message takes the list); free-form JSON is a Struct, or a
#: Value where it may be other than an object (`output`: text, vectors or labels).
COMPATIBLE: dict[str, set[str]] = {
    "str": {"string"},
    "int": {"int32", "int64", "uint32", "uint64", "sint32", "sint64"},
    "float": {"double", "float"},
    "bool": {"bool"},
    "list[str]": {"repeated string"},
    "str | list[str]": {"repeated string"},
    "list[float]": {"repeated float", "repeated double"},
    "dict": {"google.protobuf.Struct", "google.protobuf.Value"},
    "Any": {"google.protobuf.Value"},
    "model": {"message"},
    "list[model]": {"repeated message"},
}

_SCALARS = {
    getattr(FieldDescriptor, f"TYPE_{t.upper()}"): t
    for t in "string bool double float int32 int64 uint32 uint64 sint32 sint64 bytes".split()
}


def _rest_kind(annotation: Any) -> str:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    origin = get_origin(annotation)
    if annotation is Any:
        return "Any"
    if origin in (Union, UnionType):
        return " | ".join(_rest_kind(a) for a in get_args(annotation) if a is not type(None))
    if origin is list:
        return f"list[{_rest_kind(get_args(annotation)[0])}]"
    if origin is dict or annotation is dict:
        return "dict"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model"
    return str(annotation.__name__)


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _nested_models(arg)]


def _proto_kind(field: FieldDescriptor) -> str:
    kind = field.message_type
    if kind is not None and kind.GetOptions().map_entry:
        return "map"
    if kind is None:
        name = _SCALARS[field.type]
    elif kind.full_name.startswith("google.protobuf."):
        name = kind.full_name
    else:
        name = "message"
    return f"repeated {name}" if field.is_repeated else name


def _rest_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {info.alias or name: info for name, info in model.model_fields.items()}


@pytest.mark.parametrize(("message", "rest"), PAIRS, ids=lambda p: p.__name__)
def test_a_message_has_the_fields_of_its_rest_body(
    message: type[Message], rest: type[BaseModel]
) -> None:
    proto, body = set(message.DESCRIPTOR.fields_by_name), set(_rest_fields(rest))
    assert not body - proto, f"{message.__name__} lacks REST fields {sorted(body - proto)}"
    assert not proto - body, f"{message.__name__} has fields REST lacks: {sorted(proto - body)}"


@pytest.mark.parametrize(("message", "rest"), PAIRS, ids=lambda p: p.__name__)
def test_a_messages_fields_carry_the_rest_types(
    message: type[Message], rest: type[BaseModel]
) -> None:
    wrong = []
    for name, info in _rest_fields(rest).items():
        field = message.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            continue  # the test above names it
        rest_kind, proto_kind = _rest_kind(info.annotation), _proto_kind(field)
        if proto_kind not in COMPATIBLE.get(rest_kind, set()):
            wrong.append(f"{name}: REST {rest_kind}, proto {proto_kind}")
        for nested in _nested_models(info.annotation):
            if PAIRED.get(nested) != getattr(field.message_type, "full_name", None):
                wrong.append(f"{name}: REST {nested.__name__} is not paired with its message")
    assert not wrong, f"{message.__name__}: " + "; ".join(wrong)


@pytest.mark.parametrize(("message", "rest"), PAIRS, ids=lambda p: p.__name__)
def test_an_unset_field_reads_as_the_rest_default(
    message: type[Message], rest: type[BaseModel]
) -> None:
    """A scalar whose REST default is None, or other than the proto zero value, needs
    `optional`: without presence an unset field and a sent zero are one, and the codec
    could not leave the key out for pydantic to fill the default."""
    wrong = []
    for name, info in _rest_fields(rest).items():
        field = message.DESCRIPTOR.fields_by_name.get(name)
        if (
            field is None
            or info.is_required()
            or field.is_repeated
            or field.message_type is not None
        ):
            continue
        default = info.get_default(call_default_factory=True)
        if (default is None or default != field.default_value) and not field.has_presence:
            wrong.append(f"{name} (REST default {default!r}) needs `optional`")
    assert not wrong, f"{message.__name__}: " + "; ".join(wrong)


# ---- 2. answers the gateway builds as dicts: every key a field, nothing lost -----------
def _on_the_wire(kind: Descriptor, body: dict[str, Any]) -> dict[str, Any]:
    """`body` as proto3 carries it: None and the zero values of fields without presence
    are absent, float fields are float32."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        field = kind.fields_by_name[key]
        inner = field.message_type
        if value is None or (not field.has_presence and value in (0, "", False, [], {})):
            continue
        if inner is not None and inner.full_name.startswith("google.protobuf."):
            out[key] = value
        elif inner is not None and inner.GetOptions().map_entry:
            out[key] = dict(value)
        elif inner is not None and [f.name for f in inner.fields] == ["values"]:  # Vector
            out[key] = [np.float32(v).tolist() for v in value]
        elif inner is not None:
            out[key] = (
                [_on_the_wire(inner, v) for v in value]
                if field.is_repeated
                else _on_the_wire(inner, value)
            )
        elif field.type == FieldDescriptor.TYPE_FLOAT:
            out[key] = np.float32(value).tolist()
        else:
            out[key] = value
    return out


def _round_trip(message: type[Message], body: dict[str, Any]) -> None:
    assert to_dict(from_dict(message, body, strict=True)) == _on_the_wire(message.DESCRIPTOR, body)


def _task(
    status: str, kind: str = "inference", model: str | None = "m", **fields: Any
) -> store.Task:
    return store.Task("t-1", "k", kind, model, "q", status, {}, 1_800_000_000.25, **fields)


TASKS = {  # tasks/runner.py task_view, in each state that adds keys
    "pending": task_view(_task(store.PENDING), queue_position=0),
    "streaming": task_view(_task(store.RUNNING, started_at=1.5, attempts=1, partial="Hel")),
    "completed": task_view(
        _task(
            store.COMPLETED,
            output=[[0.5, 1.0]],
            started_at=1.5,
            finished_at=2.0,
            usage={"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3},
            expires_at=9.0,
        )
    ),
    "failed": task_view(_task(store.FAILED, error={"code": "model_failed", "message": "no"})),
    "bulk upsert": task_view(
        _task(store.RUNNING, "upsert", None, progress=data.bulk_progress(64, 100, 310))
    ),
}


@pytest.mark.parametrize("view", TASKS.values(), ids=TASKS.keys())
def test_a_task_view_is_a_task(view: dict[str, Any]) -> None:
    _round_trip(pb.Task, view)


def test_an_async_upsert_answers_with_its_task() -> None:
    _round_trip(pb.UpsertResponse, {"index": "docs", "task": TASKS["bulk upsert"]})


def test_embeddings_are_an_embed_response() -> None:
    """gateway/dataplane/inference.py `embed_texts`; 0.1 is not a float32."""
    answer: dict[str, Any] = {
        "model": "e5",
        "dimension": 3,
        "data": [[0.1, -0.25, 1e-7], [0.0, 1.0, 0.3]],
        "usage": {"prompt_tokens": 7},
    }
    _round_trip(pb.EmbedResponse, answer)
    vectors = to_dict(from_dict(pb.EmbedResponse, answer))["data"]
    assert np.allclose(vectors, answer["data"], rtol=1e-6, atol=0)


def test_a_search_answer_is_a_search_response() -> None:
    """The index replica's hits (knowledge/deployment.py `_search`) with what the gateway
    adds and removes (dataplane/data.py `search`: index, took_ms; cache popped)."""
    hit = {
        "document_id": "d1", "chunk_index": 0, "text": "Paris", "score": 0.83,
        "metadata": {"lang": "en", "year": 2024, "tags": ["a"]},
        "subject_id": None, "start": 0, "end": 5,
    }  # fmt: skip

    class Indexes:
        async def search(self, index: str, request: dict[str, Any]) -> dict[str, Any]:
            return {"hits": [hit, {**hit, "subject_id": "s1"}], "query_tokens": 4, "cache": "HIT"}

    state = SimpleNamespace(index=lambda name: None, index_replicas=Indexes())
    answer = asyncio.run(data.search(cast(Any, state), "docs", {"index": "docs", "query": "q"}))
    _round_trip(pb.SearchResponse, answer)
    _round_trip(pb.SearchResponse, {**answer, "query_tokens": 0})  # a vector query


def test_an_upsert_answer_is_an_upsert_response() -> None:
    """knowledge/deployment.py `_upsert`'s return, as the gateway passes it on."""
    answer = {
        "index": "docs",
        "erased": ["d3"],
        "documents": [{"id": "d1", "chunks": 3, "stale_chunks_removed": 0}],
        "chunks": 3,
        "tokens": 512,
    }
    _round_trip(pb.UpsertResponse, answer)


def test_an_erasure_receipt_is_a_delete_response() -> None:
    """dataplane/data.py `erase` (documents); a subject's receipt has the same keys."""

    class Indexes:
        async def delete(self, index: str, ids: list[str] | None, subject: str | None) -> int:
            return 4

    state = SimpleNamespace(
        index=lambda name: SimpleNamespace(name=name),
        options=SimpleNamespace(modules=()),
        index_replicas=Indexes(),
    )
    receipt = asyncio.run(data.erase(cast(Any, state), "docs", ["d1", "d2"], None))
    _round_trip(pb.DeleteResponse, receipt)
    subject = {**receipt, "subject_id": "s1", "document_ids": None, "tasks_removed": 2}
    _round_trip(pb.DeleteResponse, subject)


def test_stream_events_are_text_chunks() -> None:
    """dataplane/inference.py `deltas`: what SSE sends and GenerateTextStream yields."""

    class Replicas:
        async def stream(self, target: str, method: Any, request: Any) -> Any:
            yield GenerationDelta("Hel")
            yield GenerationDelta("lo", "stop", prompt_tokens=3, completion_tokens=2)

    state = SimpleNamespace(model_replicas=Replicas())
    model = SimpleNamespace(target="m")

    async def events() -> list[dict[str, Any]]:
        return [e async for e in inference.deltas(cast(Any, state), cast(Any, model), None, "r")]

    found = asyncio.run(events())
    assert len(found) == 2 and "usage" in found[-1]
    for event in found:
        _round_trip(pb.TextChunk, event)


# model status: status.py `model_status` (`app_status`, rollout.py `versioned_status`),
# what gateway/status_cache.py adds, and what dataplane/models.py `status` adds to that
NOW = 1_800_000_000.0
#: A replica's info() (engines/base.py `info` with `_gpu_info`, deployments.py `info`).
GPU_INFO = {
    "name": "gpu", "task": "text-generation", "model_id": "org/base", "device": "cuda",
    "precision": "bfloat16", "engine": "torch", "parameters": 124_000_000,
    "resident_memory_bytes": 2_000_000_000, "threads": 8, "pid": 42,
    "engine_note": "flash attention off",
    "gpus": [{
        "index": 0, "name": "NVIDIA H200", "memory_used_bytes": 3_000_000_000,
        "memory_total_bytes": 150_000_000_000, "utilization_percent": 12,
    }],
    "running_requests": 2, "waiting_requests": 3,
}  # fmt: skip


def _app(replicas: list[dict[str, Any]], status: str, target: int) -> dict[str, Any]:
    deployment = {
        "status": "HEALTHY" if status == "RUNNING" else "UPDATING",
        "message": "",
        "target_num_replicas": target,
        "required_resources": {"CPU": 2.0},
        "replicas": replicas,
    }
    return {"status": status, "message": "", "deployments": {"ModelServer": deployment}}


def _statuses() -> tuple[dict[str, DifyModel], dict[str, dict[str, Any]]]:
    running = {"state": "RUNNING", "pid": 7}
    unplaced = {"state": "STARTING", "pid": None, "start_time_s": NOW - 60}
    spec = DifyModelSpec.model_validate
    versioned = spec(
        {
            "modelId": "org/base",
            "versions": [
                {"name": "v1", "modelId": "org/v1", "weight": 100},
                {"name": "v2", "modelId": "org/v2", "weight": 0},
            ],
        }
    )
    canary = start(
        versioned,
        switch_target(versioned, "v2", SwitchStrategy.CANARY, 10),
        SwitchStrategy.CANARY,
        NOW,
    )
    specs = {
        "gpu": spec({"modelId": "org/base"}),
        "waiting": spec({"modelId": "org/base", "resources": {"cpus": 2}}),
        "zero": spec({"modelId": "org/base", "autoscaling": {"minReplicas": 0, "maxReplicas": 1}}),
        "canary": canary,
    }
    apps = {
        model_app_name("gpu"): _app([running], "RUNNING", 1),
        model_app_name("waiting"): _app([unplaced], "DEPLOYING", 1),
        model_app_name("zero"): _app([], "RUNNING", 0),
        model_app_name("canary", "v1"): _app([running], "RUNNING", 1),
        model_app_name("canary", "v2"): _app([], "DEPLOYING", 1),
    }
    statuses = {n: model_status(n, s, apps, 1.0, {"CPU": 0.5}, NOW) for n, s in specs.items()}
    statuses["zero"]["last_cold_start_s"] = 4.2  # status_cache.py `woke`
    catalog = {n: DifyModel(metadata=ObjectMeta(name=n), spec=s) for n, s in specs.items()}
    return catalog, statuses


def _shown_statuses() -> list[dict[str, Any]]:
    """dataplane/models.py `status` over stand-ins for the status cache and replicas."""
    catalog, statuses = _statuses()
    infos = {"gpu": GPU_INFO, "canary@v1": {**GPU_INFO, "active_requests": 1}}

    class Status:
        async def refresh(self) -> dict[str, dict[str, Any]]:
            return statuses

        def waiting_hint(self, name: str, spec: Any, waiting: float | None) -> str | None:
            return "adjust concurrency" if waiting else None

    class Replicas:
        async def info(self, target: str) -> dict[str, Any]:
            return infos.get(target, {})

    state = SimpleNamespace(
        status=Status(), catalog=SimpleNamespace(models=lambda: catalog), model_replicas=Replicas()
    )
    return asyncio.run(models.status(cast(Any, state)))


MODELS = ("gpu", "waiting", "zero", "canary")


@pytest.fixture(scope="module")
def shown() -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in _shown_statuses()}


def test_the_statuses_cover_what_the_code_writes(shown: dict[str, dict[str, Any]]) -> None:
    """The cases above reach every branch that adds keys (else the next test proves less)."""
    assert sorted(shown) == sorted(MODELS)
    assert shown["waiting"]["reason"] == "Unschedulable" and shown["waiting"]["needs"]
    assert shown["zero"]["scaled_to_zero"] and shown["zero"]["last_cold_start_s"]
    assert shown["canary"]["rollout"]["strategy"] == "canary" and shown["canary"]["versions"]
    assert shown["gpu"]["gpus"] and shown["gpu"]["hint"]


def test_every_model_status_key_has_a_field(shown: dict[str, dict[str, Any]]) -> None:
    messages = {"ModelStatus": pb.ModelStatus, "VersionStatus": pb.VersionStatus, "Gpu": pb.Gpu}
    keys: dict[str, set[str]] = {name: set() for name in messages}
    for status in shown.values():
        keys["ModelStatus"] |= set(status)
        keys["VersionStatus"] |= {k for v in status.get("versions") or [] for k in v}
        keys["Gpu"] |= {k for g in status.get("gpus") or [] for k in g}
    missing = {
        name: sorted(keys[name] - set(message.DESCRIPTOR.fields_by_name))
        for name, message in messages.items()
    }
    assert not any(missing.values()), f"keys with no field: {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_a_model_status_is_a_model_status(name: str, shown: dict[str, dict[str, Any]]) -> None:
    _round_trip(pb.ModelStatusResponse, {"models": [shown[name]]})


# ---- 3. the committed stubs are what `make proto` generates ---------------------------
GENERATED = ("dify_pb2.py", "dify_pb2.pyi", "dify_pb2_grpc.py")


def test_the_committed_stubs_are_not_stale(tmp_path: Path) -> None:
    """The Makefile's protoc command, run on a copy (grpcio-tools is pinned in dev)."""
    source = tmp_path / "dify_serving" / "grpc" / "dify.proto"
    source.parent.mkdir(parents=True)
    source.write_bytes(PROTO.read_bytes())
    outs = [f"--{kind}_out={tmp_path}" for kind in ("python", "pyi", "grpc_python")]
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", *outs, str(source)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    stale = [n for n in GENERATED if (source.parent / n).read_bytes() != (STUBS / n).read_bytes()]
    assert not stale, f"stale stubs {stale}: run make proto"


def _gitattributes_generated(path: str) -> bool:
    attributes = ROOT / ".gitattributes"
    lines = attributes.read_text().splitlines() if attributes.exists() else []
    return any(
        fnmatch(path, line.split()[0])
        and {"linguist-generated", "linguist-generated=true"} & set(line.split()[1:])
        for line in lines
        if line.strip() and not line.startswith("#")
    )


def test_the_stubs_are_marked_generated_and_not_linted() -> None:
    """Marked by protoc's header or, for the .pyi protoc writes none into, by
    `.gitattributes` (linguist-generated: collapsed in reviews)."""
    excluded = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    unmarked = []
    for name in GENERATED:
        path = (STUBS / name).relative_to(ROOT).as_posix()
        assert any(fnmatch(path, p) for p in excluded["extend-exclude"]), f"ruff lints {path}"
        head = (STUBS / name).read_text()[:200]
        if "DO NOT EDIT" not in head and not _gitattributes_generated(path):
            unmarked.append(path)
    assert not unmarked, f"not marked generated: {unmarked}"


# ---- 4. buf's rules, where they fit ---------------------------------------------------
def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    return proto


FILE = _file()
PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")


def _messages(
    messages: Any = FILE.message_type, prefix: str = ""
) -> list[tuple[str, descriptor_pb2.DescriptorProto]]:
    """Every message with its dotted name, nested ones too (map entries: protoc's own)."""
    out = []
    for m in messages:
        if not m.options.map_entry:
            out.append((prefix + m.name, m))
            out += _messages(m.nested_type, f"{prefix}{m.name}.")
    return out


def test_the_package_is_versioned() -> None:
    """PACKAGE_LOWER_SNAKE_CASE, PACKAGE_VERSION_SUFFIX (PACKAGE_DIRECTORY_MATCH does not
    fit: the file lives with the Python package that imports its stubs)."""
    assert FILE.syntax == "proto3"
    assert FILE.package == "difymirror.v1"
    assert re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)*\.v\d+((alpha|beta)\d*)?", FILE.package)


def test_names_follow_the_style_guide() -> None:
    """MESSAGE_PASCAL_CASE, FIELD_LOWER_SNAKE_CASE, ENUM_* (no enums today)."""
    wrong = [name for name, _ in _messages() if not PASCAL.match(name.rsplit(".", 1)[-1])]
    wrong += [
        f"{n}.{f.name}" for n, m in _messages() for f in m.field if not LOWER_SNAKE.match(f.name)
    ]
    enums = [*FILE.enum_type, *(e for _, m in _messages() for e in m.enum_type)]
    for enum in enums:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        for value in enum.value:
            if not UPPER_SNAKE.match(value.name) or not value.name.startswith(prefix):
                wrong.append(value.name)
            if value.number == 0 and not value.name.endswith("_UNSPECIFIED"):
                wrong.append(f"{value.name}: the zero value is {prefix}UNSPECIFIED")
    assert not wrong, f"names against the style guide: {wrong}"


def test_field_numbers_are_unique_valid_and_not_reserved() -> None:
    wrong = []
    for name, message in _messages():
        numbers = Counter(f.number for f in message.field)
        wrong += [f"{name}: {n} used {c} times" for n, c in numbers.items() if c > 1]
        for field in message.field:
            where = f"{name}.{field.name} = {field.number}"
            if not 1 <= field.number < 2**29 or 19000 <= field.number <= 19999:
                wrong.append(f"{where}: not a usable field number")
            if any(r.start <= field.number < r.end for r in message.reserved_range):
                wrong.append(f"{where}: the number is reserved")
            if field.name in message.reserved_name:
                wrong.append(f"{where}: the name is reserved")
    assert not wrong, "; ".join(wrong)


#: The service, as the issue names its RPCs: (request, response, server streaming).
SERVICE = {
    "GenerateText": ("TextRequest", "TextResponse", False),
    "GenerateTextStream": ("TextRequest", "TextChunk", True),
    "Embed": ("EmbedRequest", "EmbedResponse", False),
    "VectorSearch": ("SearchRequest", "SearchResponse", False),
    "Upsert": ("UpsertRequest", "UpsertResponse", False),
    "Delete": ("DeleteRequest", "DeleteResponse", False),
    "SubmitTask": ("TaskRequest", "Task", False),
    "GetTask": ("GetTaskRequest", "Task", False),
    "GetModelStatus": ("ModelStatusRequest", "ModelStatusResponse", False),
}
#: RPC_REQUEST_RESPONSE_UNIQUE's exceptions: one body streamed or not (as REST's
#: `stream`), and one task whether just submitted or looked up (as REST answers both).
SHARED = {"TextRequest": {"GenerateText", "GenerateTextStream"}, "Task": {"SubmitTask", "GetTask"}}


def _methods() -> dict[str, tuple[str, str, bool]]:
    def short(name: str) -> str:
        return name.removeprefix(f".{FILE.package}.")

    return {
        m.name: (short(m.input_type), short(m.output_type), m.server_streaming)
        for s in FILE.service
        for m in s.method
        if not m.client_streaming
    }


def test_the_service_has_the_rpcs_of_the_issue() -> None:
    """SERVICE_SUFFIX, RPC_PASCAL_CASE, and GenerateText / VectorSearch by those names."""
    assert [s.name for s in FILE.service] == ["DifyService"]
    assert _methods() == SERVICE
    assert all(PASCAL.match(name) for name in _methods())


def test_rpc_requests_and_responses_are_unique() -> None:
    users: dict[str, set[str]] = {}
    for rpc, (request, response, _) in _methods().items():
        users.setdefault(request, set()).add(rpc)
        users.setdefault(response, set()).add(rpc)
    shared = {kind: rpcs for kind, rpcs in users.items() if len(rpcs) > 1}
    assert shared == SHARED, "a request or response type serves more than one RPC"


#: Every field's number as released: {message: {field: number}}. A number, once given,
#: is the field's for good (clients compiled against it decode by number). The snapshot
#: grows when a field is added (the test below asks for it); a field removed leaves the
#: snapshot as it is, and the message `reserved`s its name and number.
# fmt: off
SNAPSHOT: dict[str, dict[str, int]] = {
    "TextRequest": {
        "model": 1, "prompt": 2, "input": 3, "max_tokens": 4, "temperature": 5, "top_p": 6,
        "seed": 7, "top_k": 8, "truncate": 9, "stream": 10
    },
    "Usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    "TextResponse": {"id": 1, "model": 2, "output": 3, "usage": 4, "finish_reason": 5},
    "TextChunk": {"id": 1, "model": 2, "delta": 3, "index": 4, "finish_reason": 5, "usage": 6},
    "EmbedRequest": {"model": 1, "input": 2, "truncate": 3},
    "Vector": {"values": 1},
    "EmbedUsage": {"prompt_tokens": 1},
    "EmbedResponse": {"model": 1, "dimension": 2, "data": 3, "usage": 4},
    "SearchRequest": {
        "index": 1, "query": 2, "vector": 3, "top_k": 4, "filter": 5, "score_threshold": 6
    },
    "Hit": {
        "document_id": 1, "chunk_index": 2, "text": 3, "score": 4, "metadata": 5, "subject_id": 6,
        "start": 7, "end": 8
    },
    "SearchResponse": {"hits": 1, "query_tokens": 2, "index": 3, "took_ms": 4},
    "Document": {"id": 1, "text": 2, "metadata": 3, "subject_id": 4},
    "UpsertRequest": {"index": 1, "documents": 2, "async": 3},
    "UpsertedDocument": {"id": 1, "chunks": 2, "stale_chunks_removed": 3},
    "UpsertResponse": {
        "index": 1, "erased": 2, "documents": 3, "chunks": 4, "tokens": 5, "task": 6
    },
    "DeleteRequest": {"index": 1, "document_ids": 2, "subject_id": 3},
    "Removed": {"index": 1, "points": 2},
    "DeleteResponse": {
        "receipt_id": 1, "completed_at": 2, "subject_id": 3, "document_ids": 4, "removed": 5,
        "points_removed": 6, "tasks_removed": 7, "feedback_removed": 8, "audit_text_shredded": 9
    },
    "TaskRequest": {
        "model": 1, "prompt": 2, "input": 3, "max_tokens": 4, "temperature": 5, "top_p": 6,
        "seed": 7, "top_k": 8, "truncate": 9, "stream": 10, "callback_url": 11, "subject_id": 12
    },
    "GetTaskRequest": {"task_id": 1},
    "Task": {
        "task_id": 1, "object": 2, "kind": 3, "model": 4, "status": 5, "created_at": 6,
        "started_at": 7, "finished_at": 8, "attempts": 9, "queue_position": 10, "output": 11,
        "error": 12, "usage": 13, "progress": 14, "expires_at": 15
    },
    "ModelStatusRequest": {"name": 1},
    "Gpu": {
        "index": 1,
        "name": 2,
        "memory_total_bytes": 3,
        "memory_used_bytes": 4,
        "utilization_percent": 5,
    },
    "VersionStatus": {
        "name": 1, "weight": 2, "phase": 3, "ready_replicas": 4, "message": 5, "active_requests": 6
    },
    "ModelStatus": {
        "name": 1, "phase": 2, "ready_replicas": 3, "desired_replicas": 4, "message": 5,
        "load_progress": 6, "reason": 7, "scaled_to_zero": 8, "needs": 9, "free": 10,
        "versions": 11, "rollout": 12, "model_id": 13, "task": 14, "device": 15, "precision": 16,
        "resident_memory_bytes": 17, "parameters": 18, "gpus": 19, "engine": 20, "engine_note": 21,
        "active_requests": 22, "running_requests": 23, "waiting_requests": 24, "hint": 25,
        "last_cold_start_s": 26
    },
    "ModelStatusResponse": {"models": 1},
}
# fmt: on


def test_no_field_number_changes_or_is_reused() -> None:
    """FIELD_NO_DELETE_UNLESS_NUMBER_RESERVED and _NAME_RESERVED, against the snapshot."""
    current = dict(_messages())
    wrong = [f"message {name} was removed" for name in SNAPSHOT.keys() - current.keys()]
    for name, fields in SNAPSHOT.items():
        message = current.get(name)
        if message is None:
            continue
        numbers = {f.name: f.number for f in message.field}
        for field, number in fields.items():
            if field in numbers and numbers[field] != number:
                wrong.append(f"{name}.{field} was {number}, is {numbers[field]}")
            elif field not in numbers:
                reserved = any(r.start <= number < r.end for r in message.reserved_range)
                if not (reserved and field in message.reserved_name):
                    wrong.append(f"{name}.{field} = {number} removed: reserve its name and number")
    assert not wrong, "; ".join(wrong)


def test_every_field_is_in_the_snapshot() -> None:
    new = [
        f"{name}.{f.name} = {f.number}"
        for name, message in _messages()
        for f in message.field
        if f.name not in SNAPSHOT.get(name, {})
    ]
    assert not new, f"new fields: add {new} to SNAPSHOT (their numbers are now for good)"
