"""Feedback, the gateway's half: rate a request or task, list ratings, erase, and metrics.

A rating names what it rates by the id the caller already holds: the `X-Request-ID` of a
request a model answered (its audit row says which model and version served it,
`feedback/served.py`) or the `task_id` of an inference task (its row says so). As Dify's
message feedback belongs to the end user who got the message, a key rates only its own
requests and tasks: another key's id is 404, as a task is (`dataplane/tasks.py`), and
that holds for `admin` too, since a rating is the satisfaction of whoever got the
answer. A second rating by the same key replaces the first.

The audit row of a request that just ended may still be on its way to the database (the
trail writes in batches from another process): a miss is looked up again after flushing
the trail, then after short waits (`FIND_WAITS_S`), before it is 404. Without security
there is no audit trail, so only tasks can be rated.

The store is opened on first use per gateway state and kept beside it (a weak map: the
state owns nothing of it). `dify_feedback_total` and `dify_feedback_satisfaction_ratio`
are read at scrape time from the database, cached for `METRICS_CACHE_S`, and only for
models (and versions) the catalog knows, so their labels stay bounded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dify_serving.feedback import (
    Feedback,
    FeedbackStore,
    Kind,
    ServedRequests,
    split_model,
    sqlite_path,
)
from dify_serving.gateway import access, metrics
from dify_serving.gateway.dataplane import tasks
from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.notes import note, note_subjects
from dify_serving.gateway.state import GatewayState
from dify_serving.security.audit import AuditTrail
from dify_serving.security.db import database_url
from dify_serving.security.secrets import read_secret
from dify_serving.tasks import store as task_rows

log = logging.getLogger(__name__)

#: Seconds slept between looks for a request's audit row that is not written yet (each
#: look flushes the trail first): 0.35 s in all before "unknown request".
FIND_WAITS_S = (0.0, 0.05, 0.1, 0.2)
#: Audit rows written after a miss carry a time at most this much older than the miss
#: (a request's row is stamped when it ends, and written within the trail's batch time).
LATE_ROW_S = 300.0
METRICS_CACHE_S = 5.0
MAX_LIST = 200


class _Backend:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.store: FeedbackStore | None = None
        self.served: ServedRequests | None = None

    def close(self) -> None:
        for opened in (self.store, self.served):
            if opened is not None:
                opened.close()


_BACKENDS: weakref.WeakKeyDictionary[GatewayState, _Backend] = weakref.WeakKeyDictionary()


def _backend(state: GatewayState) -> _Backend:
    backend = _BACKENDS.get(state)
    if backend is None:
        backend = _BACKENDS.setdefault(state, _Backend())
        weakref.finalize(state, backend.close)
    return backend


def _database(state: GatewayState) -> str | None:
    """The configured database (PostgreSQL), or None for this machine's SQLite files."""
    options = state.options
    if not (options.security.database or options.tasks.database):
        return None
    url = read_secret("database_url", Path(options.home))
    if not url:
        raise ApiError(503, "unavailable", "the feedback database is not configured here")
    return url


def store(state: GatewayState, *, create: bool = True) -> FeedbackStore | None:
    """The feedback store, opened on first use; with `create` False, None while there is
    no database to open (no SQLite file yet: nothing was ever rated here)."""
    backend = _backend(state)
    with backend.lock:
        if backend.store is None:
            database = _database(state)
            if database is None and not create and not sqlite_path(state.options.home).exists():
                return None
            backend.store = FeedbackStore.open(state.options.home, database)
        return backend.store


def _served(state: GatewayState) -> ServedRequests:
    backend = _backend(state)
    with backend.lock:
        if backend.served is None:
            url = database_url(Path(state.options.home), _audit_database(state), "audit")
            backend.served = ServedRequests(url)
        return backend.served


def _audit_database(state: GatewayState) -> str | None:
    if not state.options.security.database:
        return None
    return read_secret("database_url", Path(state.options.home))


# ---- rating -------------------------------------------------------------------------------
async def rate(
    state: GatewayState,
    trail: AuditTrail | None,
    *,
    request_id: str | None,
    task_id: str | None,
    rating: str,
    comment: str | None,
    subject_id: str | None,
) -> tuple[dict[str, Any], bool]:
    """Store the caller's rating of its request or task: (the rating, replaced or not)."""
    who = tasks.owner()
    kind: Kind
    if task_id is not None:
        kind, ref = "task", task_id
        served = await _task_model(state, task_id, who)
    else:
        assert request_id is not None
        kind, ref = "request", request_id
        served = await _request_model(state, trail, request_id)
    model, version = split_model(served)
    opened = await asyncio.to_thread(store, state)  # the first call opens the database
    assert opened is not None
    saved, replaced = await asyncio.to_thread(
        lambda: opened.rate(
            kind=kind,
            ref=ref,
            key_id=who,
            model=model,
            version=version,
            rating=rating,
            comment=comment,
            subject_id=subject_id,
        )
    )
    note(detail=f"feedback on {kind} {ref}: {rating}" + (" (replaced)" if replaced else ""))
    note_subjects([subject_id])
    return view(saved), replaced


async def _task_model(state: GatewayState, task_id: str, who: str) -> str:
    """The model (`name@version`) that ran the caller's task; 404/409/422 otherwise."""
    task_store, _ = state.task_backend()
    task = await asyncio.to_thread(task_store.get, task_id)
    if task is None or task.owner != who:
        raise ApiError(404, "task_not_found", f"task {task_id!r} does not exist")
    if not task.model:
        raise ApiError(
            422,
            "not_rateable",
            f"task {task_id} ({task.kind}) was not answered by a model: only inference "
            "tasks can be rated",
        )
    if task.status != task_rows.COMPLETED:
        raise ApiError(
            409,
            "task_not_completed",
            f"task {task_id} is {task.status}: only a completed task's answer can be rated",
        )
    output = task.output
    answered = output.get("model") if isinstance(output, dict) else None
    if isinstance(answered, str) and split_model(answered)[0] == task.model:
        return answered  # name@version when the model has versions
    return task.model


async def _request_model(state: GatewayState, trail: AuditTrail | None, request_id: str) -> str:
    """The model (`name@version`) that answered the caller's request, from its audit row."""
    if trail is None:
        raise ApiError(
            404,
            "request_not_found",
            f"request {request_id!r} is not on record: this gateway keeps no audit trail "
            "(security is off), so only tasks (task_id) can be rated here",
        )
    key = access.current()
    key_id = None if key is None else key.id
    served = await asyncio.to_thread(_served, state)
    started = time.time()
    since = started - state.options.security.retention_days * 86400.0
    found = await asyncio.to_thread(served.find, request_id, key_id, since)
    late = max(since, started - LATE_ROW_S)  # rows written from now on: the rest was searched
    for wait in FIND_WAITS_S:
        if found is not None:
            break
        await asyncio.sleep(wait)
        await asyncio.to_thread(trail.flush)
        found = await asyncio.to_thread(served.find, request_id, key_id, late)
    if found is None:
        raise ApiError(404, "request_not_found", f"request {request_id!r} is not on record")
    if not found.model:
        raise ApiError(
            422,
            "not_rateable",
            f"request {request_id!r} ({found.route}) was not answered by a model: only "
            "inference requests can be rated",
        )
    if found.status >= 400:
        raise ApiError(
            422,
            "not_rateable",
            f"request {request_id!r} failed (status {found.status}): only answered requests "
            "can be rated",
        )
    return found.model


def view(saved: Feedback) -> dict[str, Any]:
    """A rating as the API shows it (stars as a number, thumbs as "up"/"down")."""
    return {
        "object": "feedback",
        "id": str(saved.seq),
        f"{saved.kind}_id": saved.ref,
        "key_id": saved.key_id,
        "model": saved.model,
        "version": saved.version,
        "rating": int(saved.rating) if saved.rating.isdigit() else saved.rating,
        "score": saved.score,
        "comment": saved.comment,
        "subject_id": saved.subject_id,
        "created_at": saved.created_at,
        "rated_at": saved.rated_at,
    }


# ---- reading, erasing ---------------------------------------------------------------------
async def listing(
    state: GatewayState,
    *,
    model: str | None,
    version: str | None,
    rating: str | None,
    key_id: str | None,
    since: float | None,
    until: float | None,
    cursor: str | None,
    limit: int,
) -> dict[str, Any]:
    """Ratings newest first, `cursor` paging; a key confined to some models names one."""
    if model is None:
        key = access.current()
        if key is not None and key.models is not None and not access.is_admin():
            raise ApiError(
                422,
                "invalid_request",
                f"model: key {key.id} may use only some models; name one of them",
            )
    else:
        access.check_model(model)
    before = None
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 18:
            raise ApiError(422, "invalid_request", "cursor: give the next_cursor of a listing")
        before = int(cursor)
    opened = await asyncio.to_thread(lambda: store(state, create=False))
    if opened is None:
        return {"object": "list", "data": [], "next_cursor": None}
    found = await asyncio.to_thread(
        lambda: opened.page(
            model=model,
            version=version,
            rating=rating,
            key_id=key_id,
            since=since,
            until=until,
            before=before,
            limit=limit + 1,
        )
    )
    page = found[:limit]
    return {
        "object": "list",
        "data": [view(saved) for saved in page],
        "next_cursor": str(page[-1].seq) if len(found) > limit else None,
    }


async def erase_subject(state: GatewayState, subject_id: str) -> int:
    """Remove the ratings given about `subject_id`; 0 when nothing was ever rated here."""
    opened = await asyncio.to_thread(lambda: store(state, create=False))
    if opened is None:
        return 0
    return await asyncio.to_thread(opened.erase_subject, subject_id)


# ---- metrics ------------------------------------------------------------------------------
class FeedbackCollector(Collector):
    """`dify_feedback_total` (ratings received, by value) and
    `dify_feedback_satisfaction_ratio` (mean score of the ratings kept) per model and
    version the catalog knows; the database is read at most every `METRICS_CACHE_S`."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Any], list[Any]] | None = None

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        figures = self._figures()
        if figures is None:
            return
        tallies, satisfaction = figures
        known = self._known()
        total = CounterMetricFamily(
            "dify_feedback",
            "Ratings received (a replaced rating counts again; erasure removes none), by "
            "model, version and value (1-5, up, down).",
            labels=["model", "version", "rating"],
        )
        for t in tallies:
            if (t.version or "") in known.get(t.model, ()):
                labels = [t.model, t.version or "", t.rating]
                total.add_metric(labels, float(t.count), created=t.created_at)
        ratio = GaugeMetricFamily(
            "dify_feedback_satisfaction_ratio",
            "Mean satisfaction of the ratings kept (up 1, down 0, r stars (r-1)/4).",
            labels=["model", "version"],
        )
        for s in satisfaction:
            if (s.version or "") in known.get(s.model, ()):
                ratio.add_metric([s.model, s.version or ""], s.ratio)
        yield total
        yield ratio

    def _figures(self) -> tuple[list[Any], list[Any]] | None:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < METRICS_CACHE_S:
                return self._cached[1], self._cached[2]
            try:
                opened = store(self.state, create=False)
                if opened is None:
                    return None
                figures = (opened.tallies(), opened.satisfaction())
            except Exception as exc:  # a scrape never fails for feedback's sake
                log.warning("feedback metrics unavailable: %s", exc)
                return None
            self._cached = (now, *figures)
            return figures

    def _known(self) -> dict[str, set[str]]:
        """Model → the version labels allowed: "" (no version) and its versions' names."""
        known: dict[str, set[str]] = {}
        for name, model in self.state.catalog.models().items():
            versions = getattr(model.spec, "versions", None) or []
            known[name] = {""} | {str(getattr(v, "name", "")) for v in versions}
        return known


#: The figures are the database's, the same from every replica: said once per scrape, by
#: the replica scraped (the registry of what a gateway holds for the whole stack).
_REGISTRY = getattr(metrics, "CLUSTER", metrics.REGISTRY)
_COLLECTORS: list[FeedbackCollector] = []


def watch(state: GatewayState) -> None:
    """Report `state`'s feedback at scrape time (a newer gateway state in the same
    process replaces the older one, as `metrics.watch` does)."""
    while _COLLECTORS:
        _REGISTRY.unregister(_COLLECTORS.pop())
    collector = FeedbackCollector(state)
    _REGISTRY.register(collector)
    _COLLECTORS.append(collector)
