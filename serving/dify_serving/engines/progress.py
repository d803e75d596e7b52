"""Load progress: what a model replica is doing while it loads, for the status route.

A first load may convert the model (OpenVINO IR, CTranslate2) for a minute or more; the
status should say so rather than show a bare "Loading". Engines call `report(stage)`;
whoever loads them (the Serve deployment) decides where the stage goes with `reporting`,
so engines stay free of Ray. A context variable, not a parameter: the stage is reported
from deep inside constructors, on the thread that builds the engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

log = logging.getLogger(__name__)

_reporter: ContextVar[Callable[[str], None] | None] = ContextVar("reporter", default=None)


@contextmanager
def reporting(callback: Callable[[str], None]) -> Iterator[None]:
    """Send the stages reported inside this block to `callback`."""
    token = _reporter.set(callback)
    try:
        yield
    finally:
        _reporter.reset(token)


def report(stage: str) -> None:
    """Say what loading does now (logged; and published while inside `reporting`)."""
    log.info("%s", stage)
    callback = _reporter.get()
    if callback is not None:
        try:
            callback(stage)
        except Exception as exc:  # progress is best effort: it never fails a load
            log.warning("could not publish load progress: %s", exc)


#: Ray's internal key-value store (GCS) holds each loading replica's stage, readable by
#: the gateway on any node; a loaded replica clears it.
LOADING_PREFIX = "dify-mirror/loading/"
KV_NAMESPACE = "dify-mirror"


def publish_stage(name: str, stage: str) -> None:
    from ray.experimental import internal_kv

    value = json.dumps({"stage": stage, "at": time.time()})
    internal_kv._internal_kv_put(LOADING_PREFIX + name, value, namespace=KV_NAMESPACE)


def clear_stage(name: str) -> None:
    from ray.experimental import internal_kv

    try:
        internal_kv._internal_kv_del(LOADING_PREFIX + name, namespace=KV_NAMESPACE)
    except Exception as exc:  # best effort, as publishing is
        log.warning("could not clear the load stage of %s: %s", name, exc)


def loading_stages(models: set[str]) -> dict[str, str]:
    """Model name → what its loading replica does now, for the `models` that exist (empty
    outside Ray). Stages of models that are gone are deleted: a replica stopped while it
    loaded (an unload, a crash) never clears its own."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return {}
    stages = {}
    for key in internal_kv._internal_kv_list(LOADING_PREFIX, namespace=KV_NAMESPACE):
        name = key.decode()[len(LOADING_PREFIX) :]
        if name not in models:
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
            continue
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw:
            stages[name] = str(json.loads(raw)["stage"])
    return stages
