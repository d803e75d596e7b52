"""Stand-in replicas behind an in-process gateway (no Ray): a generator that upper-cases
the prompt (a stream: "Hello", then " world" once `release` is set), an embedder of
three-number vectors, and an index that answers one hit and acknowledges writes. Each
answers the way Serve's handles do: awaitable, cancellable calls.

Install them on a `GatewayState` with `install(state, llm=..., embed=..., index=...)`,
or take a whole guarded gateway over them with `guarded_app(home)`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

from dify_serving.engines.protocol import Embeddings, Generation, GenerationDelta
from dify_serving.render import index_app_name, model_app_name


class Call:
    """A replica call: awaitable, cancellable (as Serve's DeploymentResponse)."""

    def __init__(self, coro: Any, on_cancel: Any) -> None:
        self.coro, self.on_cancel = coro, on_cancel

    def __await__(self) -> Any:
        return self.coro.__await__()

    def cancel(self) -> None:
        self.on_cancel()


class Method:
    def __init__(self, remote: Any) -> None:
        self.remote = remote


class Stream:
    """ "Hello", then " world" once the test releases it; cancel() before the end counts."""

    def __init__(self, llm: Llm) -> None:
        self.llm, self.sent, self.stopped = llm, 0, False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self.sent == 0:
            self.sent = 1
            return GenerationDelta("Hello")
        if self.sent == 1:
            while not self.llm.release.is_set():
                if self.stopped:
                    raise RuntimeError("request cancelled")
                await asyncio.sleep(0.01)
            self.sent = 2
            return GenerationDelta(" world", "stop", 3, 2)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.stopped = True
        if self.sent < 2:
            self.llm.cancelled.set()


def _text(request: Any) -> str:
    """The prompt, or a conversation's last content (what the stand-in answers with)."""
    if request.prompt is not None:
        return str(request.prompt)
    contents = [str(m.get("content") or "") for m in request.messages or ()]
    return contents[-1] if contents else ""


class Llm:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.cancelled = threading.Event()
        self.slow = False

    def options(self, **_: Any) -> Llm:
        return self

    @property
    def generate(self) -> Method:
        return Method(lambda request: Call(self._generate(request), self.cancelled.set))

    @property
    def generate_stream(self) -> Method:
        return Method(lambda request: Stream(self))

    async def _generate(self, request: Any) -> Generation:
        if self.slow:
            await asyncio.sleep(30)
        return Generation(_text(request).upper(), "length", 3, request.max_tokens)


class Embedder:
    def options(self, **_: Any) -> Embedder:
        return self

    @property
    def embed_each(self) -> Method:
        async def embed(requests: list[Any]) -> list[Embeddings]:
            return [
                Embeddings(np.asarray([[0.1, -1 / 3, float(len(t))] for t in r.texts], "f4"), 2)
                for r in requests
            ]

        return Method(lambda requests: Call(embed(requests), lambda: None))


class Index:
    def __init__(self) -> None:
        self.deleted: list[Any] = []

    def options(self, **_: Any) -> Index:
        return self

    def __getattr__(self, method: str) -> Method:
        async def answer(*args: Any) -> Any:
            if method == "search":
                hit = {
                    "document_id": "d1",
                    "chunk_index": 0,
                    "text": "refunds within 30 days",
                    "score": 0.75,
                    "metadata": {"lang": "en", "year": 2024},
                    "subject_id": None,
                    "start": 0,
                    "end": 22,
                }
                return {"hits": [hit], "query_tokens": 4, "cache": None}
            if method == "delete":
                self.deleted.append(args)
                return 3
            documents = args[0]
            return {
                "index": "kb",
                "erased": [],
                "documents": [
                    {"id": d["id"], "chunks": 1, "stale_chunks_removed": 0} for d in documents
                ],
                "chunks": len(documents),
                "tokens": 5,
            }

        return Method(lambda *args: Call(answer(*args), lambda: None))


class Control:
    """A Ray dashboard for the gateway's catalog: it takes every Serve config (kept in
    `applied`) and lists no application, as after every app has stopped."""

    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []

    async def put_applications(self, config: dict[str, Any]) -> None:
        self.applied.append(config)

    async def get_applications(self) -> dict[str, Any]:
        return {"applications": {}}


class _Pinned(dict):  # type: ignore[type-arg]
    """Replica handles a gateway never drops: after a failed call the gateway forgets
    a handle and would look it up in Serve next, which starts a Ray."""

    def pop(self, key: Any, *default: Any) -> Any:
        return self[key] if key in self else dict.pop(self, key, *default)


def install(state: Any, models: dict[str, Any], indexes: dict[str, Any]) -> None:
    """Answer for these models and indexes (name → stand-in) from `state`'s replica clients."""
    for replicas, given, app_name in (
        (state.model_replicas, models, model_app_name),
        (state.index_replicas, indexes, index_app_name),
    ):
        replicas._handles = _Pinned(replicas._handles)
        for name, replica in given.items():
            replicas._handles[app_name(name)] = replica


def guarded_app(home: Any) -> Any:
    """A gateway with its guard on (keys, audit, limits) over stand-ins: model `llm`
    (streams end at once), model `embed`, index `kb`; loads, unloads and index changes
    are applied to a stand-in dashboard. Close it with `app.state.guard.close()`."""
    from pathlib import Path

    from support import index_doc, model_doc

    from dify_serving.catalog.files import LocalStateStore
    from dify_serving.gateway.app import create_app
    from dify_serving.gateway.state import GatewayState
    from dify_serving.manifests import parse_documents
    from dify_serving.options import GatewayOptions, SecurityOptions, ServeOptions
    from dify_serving.security.secrets import Secrets

    docs = [
        model_doc("llm", "builtin:demo-llm", "text-generation", generation={"maxNewTokens": 16}),
        model_doc("embed", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction"),
        index_doc("kb", "embed"),
    ]
    options = GatewayOptions(home=str(home), security=SecurityOptions())
    LocalStateStore(Path(home)).save(parse_documents(docs), ServeOptions(gateway=options))
    state = GatewayState(options)
    llm = Llm()
    llm.release.set()  # streams end at once
    install(state, {"llm": llm, "embed": Embedder()}, {"kb": Index()})
    state.catalog.dashboard = Control()
    return create_app(state, Secrets(Path(home)))
