"""`Cache-Control` in, `X-Cache: HIT|MISS` out, for the routes whose answers are cached.

The data plane decides what is cacheable (deterministic generation, embeddings, searches)
and routers stay as they are: this pure ASGI middleware puts one `CacheUse` in a context
variable for each request to a route in `CACHED_ROUTES`, the data plane reads the
client's wishes from it and writes the outcome into it (`lookup`, `store`), and the
middleware adds the header when the response starts. The object is mutated, never
re-set, so the outcome reaches the middleware from wherever the data plane ran (a
context copied into a thread or a child task shares the object). A request that cached
nothing (a sampled generation, a stream, a classification) gets no header.

`Cache-Control: no-cache` answers afresh and keeps the fresh answer; `no-store` neither
reads nor keeps one. A batch (`WISHES_ONLY`) follows the client's wishes but gets no
header (its items differ); async tasks use the cache as a plain request does. What is
about a data subject (`X-Dify-Subject`, a task's `subject_id`) is never kept: an erasure
cannot find cached answers by subject, so none are made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dify_serving.gateway import access
from dify_serving.gateway.metrics import CACHE_LOOKUPS
from dify_serving.tasks.cache import ResultCache

#: Routes whose one answer is one cached result (or none): they get `X-Cache`.
CACHED_ROUTES = frozenset(
    (
        "/v1/inference",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/chat",
        "/v1/data/embed",
        "/v1/data/search",
    )
)
#: Routes whose requests say how to use the cache but get no X-Cache header.
WISHES_ONLY = frozenset(("/v1/inference/batch",))
HIT, MISS = "HIT", "MISS"
_HEADERS = {HIT: (b"x-cache", b"HIT"), MISS: (b"x-cache", b"MISS")}


class CacheUse:
    """One request's say over the cache, and what the cache did for it."""

    __slots__ = ("fresh", "no_store", "outcome")

    def __init__(self, fresh: bool = False, no_store: bool = False) -> None:
        self.fresh = fresh or no_store
        self.no_store = no_store
        self.outcome: str | None = None


CACHE: ContextVar[CacheUse | None] = ContextVar("dify_cache", default=None)


def may_read() -> bool:
    """False when the client asked for a fresh answer (`Cache-Control: no-cache`)."""
    use = CACHE.get()
    return use is None or not use.fresh


def record(outcome: str | None) -> None:
    """The cache's outcome for this request (HIT or MISS); None leaves it unset."""
    use = CACHE.get()
    if outcome in (HIT, MISS):
        CACHE_LOOKUPS.labels(outcome.lower()).inc()
        if use is not None:
            use.outcome = outcome


async def lookup(cache: ResultCache, key: str) -> bytes | None:
    """The cached answer under `key`, unless the client wants a fresh one; notes the outcome."""
    found = await cache.get(key) if may_read() else None
    record(MISS if found is None else HIT)
    return found


async def store(cache: ResultCache, key: str, value: bytes) -> None:
    """Keep a fresh answer, unless the client said `no-store`."""
    use = CACHE.get()
    if use is None or not use.no_store:
        await cache.put(key, value)


def key_scope() -> str:
    """The calling key's resource scope, part of every cache key: `-` without security,
    `admin`, else its model and index patterns (`*` for all). Keys with the same reach
    share entries; no entry crosses to a key that reaches other resources."""
    key = access.current()
    if key is None:
        return "-"
    if access.is_admin():
        return "admin"
    models = ",".join(sorted(key.models)) if key.models is not None else "*"
    indexes = ",".join(sorted(key.indexes)) if key.indexes is not None else "*"
    return f"models={models};indexes={indexes}"


def index_cache_args() -> dict[str, Any]:
    """What an index replica's search cache needs of this request (it keeps the cache:
    `knowledge/deployment.py`): the key's scope, and whether it may read and keep."""
    use = CACHE.get()
    return {
        "scope": key_scope(),
        "read": use is None or not use.fresh,
        "keep": use is None or not use.no_store,
    }


def _wishes(headers: list[tuple[bytes, bytes]]) -> CacheUse:
    """The client's `Cache-Control`; a request about a data subject (`X-Dify-Subject`) is
    never kept, so an erasure leaves no answer of the subject's behind in the cache."""
    fresh = no_store = False
    for name, value in headers:
        if name == b"cache-control":
            directives = {d.strip() for d in value.lower().split(b",")}
            fresh, no_store = b"no-cache" in directives, no_store or b"no-store" in directives
        elif name == b"x-dify-subject":
            no_store = True
    return CacheUse(fresh=fresh, no_store=no_store)


@contextlib.contextmanager
def subject_use(subject_id: str | None) -> Iterator[None]:
    """Around a task's run: a task about a data subject neither reads nor keeps cached
    answers (as `X-Dify-Subject` on a request)."""
    if subject_id is None:
        yield
        return
    token = CACHE.set(CacheUse(no_store=True))
    try:
        yield
    finally:
        CACHE.reset(token)


class CacheHeader:
    """Pure ASGI: a `CacheUse` per cached route, `X-Cache` on its successful answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") if scope["type"] == "http" else None
        if path not in CACHED_ROUTES:
            if path not in WISHES_ONLY:
                await self.app(scope, receive, send)
                return
            token = CACHE.set(_wishes(scope["headers"]))
            try:
                await self.app(scope, receive, send)
            finally:
                CACHE.reset(token)
            return
        use = _wishes(scope["headers"])
        token = CACHE.set(use)

        async def send_marked(message: Message) -> None:
            outcome = use.outcome
            if (
                outcome is not None
                and message["type"] == "http.response.start"
                and message.get("status", 200) < 400
            ):
                message["headers"] = [*message.get("headers", []), _HEADERS[outcome]]
            await send(message)

        try:
            await self.app(scope, receive, send_marked)
        finally:
            CACHE.reset(token)
