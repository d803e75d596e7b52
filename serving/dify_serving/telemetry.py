"""Figures from every replica in one scrape: each replica pushes its registry to one hub.

Every model, index and gateway replica keeps its own prometheus-client registry. A
thread in the replica pushes the registry's families every `PUSH_INTERVAL_S` to one
named Ray actor (`MetricsHub`, detached, no CPU); the gateway replica that answers
`GET /v1/metrics` asks the hub once for everyone else's and writes them beside its own
(`gateway/metrics.py`). A request costs only the prometheus-client updates in the
replica that served it; a scrape costs one actor call.

Chosen by measurement (Ray 2.60, token auth on, 2 cores; docs/benchmarks.md):

- Ray's own metrics (`ray.util.metrics`) do work with token auth (each node's metrics
  agent serves its export port without the token), but a value appears there only after
  the agent's 10 s report interval; the page is ~325 KB with ~950 samples of Ray's own
  per node (100 ms to fetch here), which the gateway would fetch from every node and
  filter; each sample carries `WorkerId`, `SessionName` and OpenTelemetry labels, a dead
  worker's series is still exported 15 s after it died, there is no `_created`, and a
  counter plus a histogram cost 8.3 µs per request (prometheus-client: 3.5 µs).
- prometheus-client's multiprocess mode shares files in one directory: one node only,
  and a dead process's counters stay in the sums.
- A pull through Serve handles reaches one replica per call, picked by the router, and
  Serve has no public call that reaches every replica.

The push measured: 2.6 ms of a replica's CPU every 2 s (10 KB for a model replica); the
wrap of a model replica's call about 16 µs; a scrape of 3 models, 2 indexes and the
gateway (540 samples) 24 ms at p50; the gateway's request metrics cost 3 % of the cheap
route's throughput (docs/benchmarks.md).

Counter resets: every replica's series carry `replica` (Serve's replica id, never
reused), so a replacement starts new series with their own `_created`, never the old
ones going backwards; `sum by (model) (rate(...))` adds them. The label stays bounded:
a replica that is stopped leaves the hub (`stop`), one that dies unannounced is dropped
after `EXPIRE_AFTER_S` without a push.

Model replicas wrap their engine's capability methods generically (`ModelTelemetry.
wrap`): requests and end-to-end latency per method, prompt and generated tokens, time to
first token and per output token (streams: a whole answer's first token is not seen),
embedding inputs and tokens. Engines add what only they know through two hooks
(`Engine.on_batch`, `Engine.queue_state`): batch sizes, waiting requests, KV-cache use.
GPU utilisation and memory come from NVML for the GPUs Ray gave the replica, and are
absent (no series) where there is no GPU or NVML fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

HUB_NAME = "dify-metrics-hub"
HUB_NAMESPACE = "dify-mirror"
#: Seconds between two pushes of a replica (a scrape sees figures at most this old).
PUSH_INTERVAL_S = float(os.environ.get("DIFY_MIRROR_METRICS_PUSH_S", "2.0"))
#: A replica that has not pushed for this long is gone (it died without leaving).
EXPIRE_AFTER_S = max(15.0, 5 * PUSH_INTERVAL_S)
REPLICA_LABEL = "replica"
#: Seconds, for time to first token and end-to-end latency (prefill on CPU: 10s of ms).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
#: Seconds per output token (a small model on CPU: a few ms; a large one on GPU: 10s).
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _counter(name: str, doc: str, own: dict[str, str], registry: CollectorRegistry) -> Counter:
    """A counter of one replica's own series: labels `own` (names and values), its child."""
    return Counter(name, doc, list(own), registry=registry).labels(*own.values())


def _histogram(
    name: str,
    doc: str,
    own: dict[str, str],
    registry: CollectorRegistry,
    buckets: tuple[float, ...],
) -> Histogram:
    """A histogram of one replica's own series: labels `own` (names and values), its child."""
    histogram = Histogram(name, doc, list(own), buckets=buckets, registry=registry)
    return histogram.labels(*own.values())


def replica_id() -> str:
    """Serve's id of this replica (unique for its life), else host and process."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not in a Serve replica (tests, the CLI)
        return f"{socket.gethostname()}-{os.getpid()}"


def relabel(families: Iterable[Metric], replica: str) -> list[Metric]:
    """`families` with `replica` added to every sample (copies; the originals stay)."""
    out = []
    for family in families:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [
            s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in family.samples
        ]
        out.append(copy)
    return out


def merge(groups: Iterable[Iterable[Metric]]) -> list[Metric]:
    """One family per name (the text formats want a family's samples together)."""
    merged: dict[str, Metric] = {}
    for families in groups:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            elif into.type != family.type:  # two replicas disagree (an upgrade): keep one
                continue
            into.samples.extend(family.samples)
    return list(merged.values())


class Families:
    """A list of families that `generate_latest` can write (it calls `collect()`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


# ---- the hub ----------------------------------------------------------------------------
class MetricsHub:
    """The named actor every replica pushes to: the latest families of each live replica."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, bytes]] = {}

    def push(self, replica: str, families: bytes) -> None:
        self._entries[replica] = (time.monotonic(), families)

    def leave(self, replica: str) -> None:
        self._entries.pop(replica, None)

    def collect(self, exclude: str | None = None) -> list[bytes]:
        """Every live replica's pushed families but `exclude`'s (the caller's own)."""
        now = time.monotonic()
        for gone in [r for r, (at, _) in self._entries.items() if now - at > EXPIRE_AFTER_S]:
            del self._entries[gone]
        return [data for r, (_, data) in self._entries.items() if r != exclude]

    def replicas(self) -> list[str]:
        return sorted(self._entries)


_HUB: Any = None
_HUB_LOCK = threading.Lock()


def hub() -> Any:
    """The hub's handle (created by whoever asks first; restarted if its node is lost)."""
    global _HUB
    with _HUB_LOCK:
        if _HUB is None:
            import ray

            actor: Any = ray.remote(MetricsHub)
            _HUB = actor.options(
                name=HUB_NAME,
                namespace=HUB_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=-1,
                max_task_retries=2,
            ).remote()
        return _HUB


def _forget_hub() -> None:
    global _HUB
    with _HUB_LOCK:
        _HUB = None


def others(own: str, timeout_s: float = 2.0) -> list[list[Metric]]:
    """The families every other live replica pushed (blocking: call it off the loop).
    Empty outside Ray, or when the hub does not answer in time (logged)."""
    import ray

    if not ray.is_initialized():
        return []
    try:
        pushed = ray.get(hub().collect.remote(own), timeout=timeout_s)
    except Exception as exc:
        _forget_hub()
        log.warning("metrics hub did not answer: %s: %s", type(exc).__name__, str(exc)[:200])
        return []
    return [pickle.loads(data) for data in pushed]


class Pusher:
    """Pushes one registry to the hub every PUSH_INTERVAL_S, from a daemon thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        #: Until `start` (in the replica, where Serve's context is known): host and pid.
        self.replica = replica_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start pushing when this process is part of a Ray cluster (else nothing to do)."""
        import ray

        if self._thread is not None or not ray.is_initialized():
            return
        self.replica = replica_id()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"metrics-push-{self.replica}", daemon=True
        )
        self._thread.start()

    def families(self) -> list[Metric]:
        return relabel(self.registry.collect(), self.replica)

    def push_once(self) -> None:
        import ray

        data = pickle.dumps(self.families(), protocol=pickle.HIGHEST_PROTOCOL)
        ray.get(hub().push.remote(self.replica, data), timeout=10)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.push_once()
                failures = 0
            except Exception as exc:  # the hub restarting, the node going: try again
                _forget_hub()
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("metrics push failed (%d): %s", failures, exc)
            self._stop.wait(PUSH_INTERVAL_S)

    def stop(self) -> None:
        """Stop pushing and leave the hub: this replica's series end now."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        try:
            hub().leave.remote(self.replica)
        except Exception as exc:  # Ray going down with us
            log.debug("metrics hub leave failed: %s", exc)


# ---- GPUs (NVML) ------------------------------------------------------------------------
class GpuCollector(Collector):
    """GPU utilisation and memory through NVML, for `devices` (indices; None: all).

    No GPU, no NVML library, or an NVML error: no series at all (absent, not zero)."""

    def __init__(self, devices: list[int] | None = None) -> None:
        self.devices = devices
        self._node = socket.gethostname()

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = self._read()
        if not readings:
            return
        labels = ["gpu", "node"]
        util = GaugeMetricFamily(
            "dify_gpu_utilization_ratio",
            "Share of the last sample period a kernel ran on the GPU (NVML), 0-1.",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "dify_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
        )
        total = GaugeMetricFamily(
            "dify_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=labels
        )
        for index, ratio, mem_used, mem_total in readings:
            key = [str(index), self._node]
            util.add_metric(key, ratio)
            used.add_metric(key, float(mem_used))
            total.add_metric(key, float(mem_total))
        yield util
        yield used
        yield total

    def _read(self) -> list[tuple[int, float, int, int]]:
        try:
            import pynvml
        except ImportError:
            return []
        try:
            pynvml.nvmlInit()
        except Exception:  # no driver, no GPU: CPU node
            return []
        try:
            count = pynvml.nvmlDeviceGetCount()
            out = []
            for index in range(count) if self.devices is None else self.devices:
                if not 0 <= index < count:
                    continue
                device = pynvml.nvmlDeviceGetHandleByIndex(index)
                rates = pynvml.nvmlDeviceGetUtilizationRates(device)
                memory = pynvml.nvmlDeviceGetMemoryInfo(device)
                out.append((index, float(rates.gpu) / 100.0, int(memory.used), int(memory.total)))
            return out
        except Exception as exc:  # a GPU fallen off the bus: say nothing rather than 0
            log.debug("NVML failed: %s", exc)
            return []
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", exc)


def ray_gpu_ids() -> list[int] | None:
    """The GPUs Ray gave this process (NVML indices); [] for none; None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return [int(i) for i in ray.get_gpu_ids()]
    except Exception:
        return None


# ---- model replicas ---------------------------------------------------------------------
class ModelTelemetry:
    """A model replica's figures (labels: model and version only) and its push to the hub."""

    def __init__(self, model: str, version: str | None = None) -> None:
        self.model = model
        self.version = version or ""
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        own = {"model": self.model, "version": self.version}
        ids, key = list(own), tuple(own.values())
        self._requests = Counter(
            "dify_model_requests",
            "Calls a model replica answered, by method and outcome (ok or error).",
            [*ids, "method", "outcome"],
            registry=r,
        )
        self._duration = Histogram(
            "dify_model_request_duration_seconds",
            "End-to-end time of a call in the model replica (a stream: to its last item).",
            [*ids, "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = _counter(
            "dify_model_prompt_tokens", "Prompt tokens of generation requests.", own, r
        )
        self.generated_tokens = _counter("dify_model_generated_tokens", "Tokens generated.", own, r)
        self.ttft = _histogram(
            "dify_model_time_to_first_token_seconds",
            "Time from a stream's arrival in the replica to its first token.",
            own,
            r,
            LATENCY_BUCKETS,
        )
        self.tpot = _histogram(
            "dify_model_time_per_output_token_seconds",
            "Time per generated token after the first, per stream.",
            own,
            r,
            TOKEN_BUCKETS,
        )
        self.embedding_inputs = _counter(
            "dify_model_embedding_inputs", "Texts (or token rows) embedded.", own, r
        )
        self.embedding_tokens = _counter(
            "dify_model_embedding_tokens", "Tokens of the texts embedded.", own, r
        )
        self.prediction_inputs = _counter(
            "dify_model_prediction_inputs", "Inputs labelled or captioned.", own, r
        )
        self._batch = _histogram(
            "dify_model_batch_size",
            "Rows in each batch the engine ran (engines that batch).",
            own,
            r,
            BATCH_BUCKETS,
        )
        self.load_seconds = Gauge(
            "dify_model_load_duration_seconds",
            "Seconds this replica took to load its model (weights, conversion, warm-up).",
            ids,
            registry=r,
        ).labels(*key)
        self.in_flight = 0
        self._queue_state: Callable[[], dict[str, float] | None] = lambda: None
        self._children: dict[tuple[str, str], Any] = {}
        r.register(_QueueCollector(self))
        gpus = ray_gpu_ids()
        if gpus:  # none: no GPU series at all (absent, not zero)
            r.register(GpuCollector(gpus))
        self.pusher = Pusher(self.registry)

    def observe_batch(self, rows: int) -> None:
        self._batch.observe(rows)

    def watch_engine(self, queue_state: Callable[[], dict[str, float] | None]) -> None:
        self._queue_state = queue_state

    def _call(self, method: str) -> tuple[Any, Any, Any]:
        """(ok counter, error counter, duration histogram) of `method`, built once."""
        children = self._children.get((method, "ok"))
        if children is None:
            key = (self.model, self.version, method)
            children = (
                self._requests.labels(*key, "ok"),
                self._requests.labels(*key, "error"),
                self._duration.labels(*key),
            )
            self._children[(method, "ok")] = children
        return children  # type: ignore[no-any-return]

    def wrap(self, method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` (an engine's capability method) counted; same signature and kind."""
        ok, error, duration = self._call(method)
        if method == "generate_stream":
            return self._wrap_stream(fn, ok, error, duration)
        count = _INPUTS.get(method)
        telemetry = self

        async def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            telemetry.in_flight += 1
            try:
                result = await fn(*args, **kwargs)
            except BaseException:
                error.inc()
                raise
            finally:
                telemetry.in_flight -= 1
                duration.observe(time.perf_counter() - started)
            ok.inc()
            if count is not None:
                count(telemetry, args, kwargs, result)
            return result

        call.__name__ = method
        call.__doc__ = fn.__doc__
        return call

    def _wrap_stream(
        self, fn: Callable[..., AsyncGenerator[Any, None]], ok: Any, error: Any, duration: Any
    ) -> Callable[..., AsyncIterator[Any]]:
        telemetry = self

        async def stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            first: float | None = None
            last: Any = None
            telemetry.in_flight += 1
            try:
                # closed at once when the caller goes (a cancelled stream): the engine's
                # own generator then ends its sequence now, not when it is collected
                async with contextlib.aclosing(fn(*args, **kwargs)) as inner:
                    async for item in inner:
                        if first is None and item.delta:
                            first = time.perf_counter()
                            telemetry.ttft.observe(first - started)
                        last = item
                        yield item
            except BaseException:
                error.inc()
                raise
            finally:
                telemetry.in_flight -= 1
                ended = time.perf_counter()
                duration.observe(ended - started)
            ok.inc()
            if last is not None and last.finish_reason:
                telemetry.prompt_tokens.inc(last.prompt_tokens)
                telemetry.generated_tokens.inc(last.completion_tokens)
                if first is not None and last.completion_tokens > 1:
                    telemetry.tpot.observe((ended - first) / (last.completion_tokens - 1))

        stream.__name__ = "generate_stream"
        return stream


def _generated(t: ModelTelemetry, args: Any, kwargs: Any, result: Any) -> None:
    t.prompt_tokens.inc(result.prompt_tokens)
    t.generated_tokens.inc(result.completion_tokens)


def _embedded_each(t: ModelTelemetry, args: Any, kwargs: Any, result: Any) -> None:
    requests = args[0] if args else kwargs.get("requests", [])
    t.embedding_inputs.inc(sum(len(r.texts) for r in requests))
    t.embedding_tokens.inc(sum(getattr(e, "prompt_tokens", 0) for e in result))


def _embedded_rows(t: ModelTelemetry, args: Any, kwargs: Any, result: Any) -> None:
    rows = args[0] if args else kwargs.get("rows", [])
    t.embedding_inputs.inc(len(rows))
    t.embedding_tokens.inc(sum(map(len, rows)))


def _predicted(t: ModelTelemetry, args: Any, kwargs: Any, result: Any) -> None:
    request = args[0] if args else kwargs.get("request")
    t.prediction_inputs.inc(len(getattr(request, "inputs", None) or []))


_INPUTS: dict[str, Callable[[ModelTelemetry, Any, Any, Any], None]] = {
    "generate": _generated,
    "embed_each": _embedded_each,
    "embed_tokens": _embedded_rows,
    "predict": _predicted,
}


class _QueueCollector(Collector):
    """Running and waiting requests and KV-cache use, read when the registry is collected."""

    def __init__(self, telemetry: ModelTelemetry) -> None:
        self.t = telemetry

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        t = self.t
        try:
            state = t._queue_state() or {}
        except Exception as exc:  # engine state read from another thread: never fail a push
            log.debug("queue state failed: %s", exc)
            state = {}
        waiting = float(state.get("waiting", 0))
        running = float(state.get("running", max(0.0, t.in_flight - waiting)))
        ids = ["model", "version"]
        key = [t.model, t.version]
        for name, doc, value in (
            ("dify_model_running_requests", "Requests the engine is working on now.", running),
            ("dify_model_waiting_requests", "Requests queued in the engine.", waiting),
        ):
            family = GaugeMetricFamily(name, doc, labels=ids)
            family.add_metric(key, value)
            yield family
        if state.get("kv_cache_usage") is not None:
            family = GaugeMetricFamily(
                "dify_model_kv_cache_usage_ratio",
                "Share of the engine's paged KV cache in use, 0-1.",
                labels=ids,
            )
            family.add_metric(key, float(state["kv_cache_usage"]))
            yield family


# ---- index replicas ---------------------------------------------------------------------
class IndexTelemetry:
    """An index replica's figures (label: index only) and its push to the hub."""

    def __init__(self, index: str, points: Callable[[], int | None]) -> None:
        self.index = index
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        own = {"index": index}
        ids = list(own)
        self._searches = Counter(
            "dify_index_searches",
            "Searches answered, by cache outcome.",
            [*ids, "cache"],
            registry=r,
        )
        self.search_seconds = _histogram(
            "dify_index_search_duration_seconds",
            "Time of a search in the index replica (embedding the query included).",
            own,
            r,
            LATENCY_BUCKETS,
        )
        self.upserts = _counter("dify_index_upserts", "Upsert calls that wrote.", own, r)
        self.upserted_chunks = _counter(
            "dify_index_upserted_chunks", "Chunks written by upserts.", own, r
        )
        self.upsert_seconds = _histogram(
            "dify_index_upsert_duration_seconds",
            "Time of an upsert call (clean, chunk, embed, write).",
            own,
            r,
            LATENCY_BUCKETS,
        )
        self.deletes = _counter(
            "dify_index_deletes", "Delete calls (documents or a subject).", own, r
        )
        self.errors = Counter(
            "dify_index_errors", "Calls that failed, by method.", [*ids, "method"], registry=r
        )
        self._hits = self._searches.labels(index, "hit")
        self._misses = self._searches.labels(index, "miss")
        self._uncached = self._searches.labels(index, "off")
        r.register(_PointsCollector(index, points))
        self.pusher = Pusher(self.registry)

    def searched(self, cache: str | None, seconds: float) -> None:
        child = {"HIT": self._hits, "MISS": self._misses}.get(cache or "", self._uncached)
        child.inc()
        self.search_seconds.observe(seconds)


class _PointsCollector(Collector):
    def __init__(self, index: str, points: Callable[[], int | None]) -> None:
        self.index = index
        self.points = points

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            count = self.points()
        except Exception as exc:  # the store away: no figure rather than a wrong one
            log.debug("index %s: count failed: %s", self.index, exc)
            return
        if count is None:
            return
        family = GaugeMetricFamily("dify_index_points", "Points (chunks) stored.", labels=["index"])
        family.add_metric([self.index], float(count))
        yield family
