"""The gateway's Prometheus metrics, and `GET /v1/metrics` in the text or OpenMetrics format.

One registry per process (`REGISTRY`, not prometheus-client's global one), filled by a
pure ASGI middleware (every request: route template, method, status, model, version,
latency, in flight), by the error handlers (errors by code), the guard (refusals), the
cache (hits, misses), and read when collected from the audit trail (entries pending,
dropped). What the gateway holds for the whole stack is read at scrape time into a
second registry (`CLUSTER`: models' phases from the status cache; tasks by status and
the depth of each queue from the task rows), so it is said once, by the replica scraped.

One scrape shows every replica (`telemetry.py` says how and why): this replica's
`REGISTRY`, live, beside what every other gateway, model and index replica pushed to
the metrics hub, each series labelled with its `replica`.

Labels stay bounded: a route is its template (`/v1/tasks/{task_id}`), a path that is no
route is `(unmatched)`; a model label only ever holds a name the catalog knows (what the
data plane noted), a version only one of its versions; never a prompt, key, request id
or task id.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dify_serving import telemetry
from dify_serving.gateway.notes import REQUEST, RequestContext
from dify_serving.gateway.policy import rule_for

REGISTRY = CollectorRegistry(auto_describe=True)
#: What this gateway knows of the whole stack, said by the replica scraped only.
CLUSTER = CollectorRegistry(auto_describe=False)
#: Seconds: fine around 0.5 s, where the P99 alert sits.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
)
UNMATCHED = "(unmatched)"
METRICS_PATH = "/v1/metrics"

REQUESTS = Counter(
    "dify_requests",
    "HTTP requests answered, by route template, method, status, model and version.",
    ["route", "method", "status", "model", "version"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "dify_request_duration_seconds",
    "Time from a request's arrival to the end of its answer (a stream's last event).",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("dify_requests_in_flight", "Requests being answered now.", registry=REGISTRY)
ERRORS = Counter(
    "dify_errors", "Error answers, by their JSON error code.", ["code"], registry=REGISTRY
)
REFUSALS = Counter(
    "dify_refusals",
    "Requests the guard refused before any work (authentication, scope, address, rate "
    "limit, second factor), by code.",
    ["code"],
    registry=REGISTRY,
)
CACHE_LOOKUPS = Counter(
    "dify_cache_lookups",
    "Result-cache lookups of requests, by outcome (hit or miss).",
    ["outcome"],
    registry=REGISTRY,
)


def route_label(method: str, path: str) -> str:
    """The route template of a request; `(unmatched)` for a path that is no route."""
    rule = rule_for(method, path)
    if rule.scopes or (rule.public and rule.template != "(public)"):
        return rule.template
    return UNMATCHED


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP request once it has answered, streams included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        # where the data plane notes the model; the guard puts its own in its place
        REQUEST.set(RequestContext())

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message.get("status", 500)
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            IN_FLIGHT.dec()
            method = scope["method"]
            route = route_label(method, scope["path"])
            noted = REQUEST.get()
            model, _, version = ((noted.model if noted else None) or "").partition("@")
            REQUESTS.labels(route, method, str(status["code"]), model, version).inc()
            LATENCY.labels(route, method).observe(time.perf_counter() - started)


class StateCollector(Collector):
    """What the gateway already holds, read at scrape time: model phases, task queues."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily(
            "dify_model_ready", "1 when the model is Ready, else 0.", labels=["model", "phase"]
        )
        for name, status in sorted(self.state.status.models.items()):
            phase = str(status.get("phase") or "Unknown")
            ready.add_metric([name, phase], 1.0 if phase == "Ready" else 0.0)
        yield ready
        opened = getattr(self.state, "_tasks", None)
        if opened is None:
            return  # no task asked for yet: nothing to open for a scrape
        counts = opened[0].counts()
        depth = GaugeMetricFamily(
            "dify_task_queue_depth", "Tasks waiting (PENDING) in each queue.", labels=["queue"]
        )
        tasks = GaugeMetricFamily(
            "dify_tasks",
            "Tasks kept, by status (finished ones until they expire).",
            labels=["status"],
        )
        by_status: dict[str, int] = {}
        waiting = dict.fromkeys(sorted({queue for queue, _ in counts}), 0)
        for (queue, status), count in counts.items():
            by_status[status] = by_status.get(status, 0) + count
            if status == "PENDING":
                waiting[queue] = count
        for queue, count in waiting.items():  # 0 for a queue drained: a series, not a gap
            depth.add_metric([queue], float(count))
        for status, count in sorted(by_status.items()):
            tasks.add_metric([status], float(count))
        yield depth
        yield tasks


class AuditCollector(Collector):
    """The audit writer of this replica: entries recorded and not yet written, and lost."""

    def __init__(self, audit: Any) -> None:
        self.audit = audit

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pending = GaugeMetricFamily(
            "dify_audit_pending_entries",
            "Audit entries recorded by this replica and not yet written.",
        )
        pending.add_metric([], float(self.audit.pending))
        yield pending
        dropped = CounterMetricFamily(
            "dify_audit_dropped_entries",
            "Audit entries lost (a full queue, an unstorable value, a dead writer).",
        )
        dropped.add_metric([], float(self.audit.dropped))
        yield dropped


_WATCHED: list[tuple[CollectorRegistry, Collector]] = []
#: This replica's push of `REGISTRY` to the metrics hub (started in a Ray replica only).
PUSHER = telemetry.Pusher(REGISTRY)


def watch(state: Any, audit: Any = None) -> None:
    """Report `state`'s models and tasks, and `audit`'s writer (one gateway at a time: a
    newer gateway state in the same process replaces the older one); in a Ray replica,
    start pushing this replica's figures to the hub."""
    for registry, collector in _WATCHED:
        registry.unregister(collector)
    _WATCHED.clear()
    watched: list[tuple[CollectorRegistry, Collector]] = [(CLUSTER, StateCollector(state))]
    if audit is not None:
        watched.append((REGISTRY, AuditCollector(audit)))
    for registry, collector in watched:
        registry.register(collector)
        _WATCHED.append((registry, collector))
    PUSHER.start()


def families() -> list[Any]:
    """Everything one scrape shows: this replica's figures live, every other replica's
    as last pushed to the hub, and what this gateway holds for the whole stack."""
    own = PUSHER.families()
    return telemetry.merge([own, *telemetry.others(PUSHER.replica), CLUSTER.collect()])


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The registry as text: OpenMetrics when the scraper asks for it, else Prometheus'."""
    gathered = telemetry.Families(families())
    if accept and "application/openmetrics-text" in accept:
        from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPEN
        from prometheus_client.openmetrics.exposition import generate_latest as open_latest

        return open_latest(gathered), OPEN  # type: ignore[arg-type]
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(gathered), CONTENT_TYPE_LATEST  # type: ignore[arg-type]
