"""Replicas killed on the real local stack: under load, and in the middle of a write.

Serve replaces a replica that died; until its successor serves, the gateway answers
each request with the model's answer or a retryable 503 (Retry-After, the JSON error
shape), never a 500, a transport's text or a hang, and an index write is all or
nothing per document: every chunk of the version that was sent, or none of it.

A model whose load raises while the others serve is asserted where the session's
`broken` model is first used: `test_models_api.py` (Failed with its reason beside the
Ready models) and `test_inference.py` (its 503, the others answering). Here a model's
replica process is killed while it loads: the others keep serving throughout.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import AUTH, wait_for

from dify_serving.knowledge.backends.base import UPSERT_BATCH
from dify_serving.render import index_app_name, model_app_name

#: Seconds any one request may take before the test calls it a hang.
CLIENT_TIMEOUT_S = 60
#: Seconds Serve gets to replace a killed replica (a model loads again on two cores).
REPLACED_WITHIN_S = 240
#: Every request reaches a replica: no answer from the gateway's result cache.
FRESH = {**AUTH, "Cache-Control": "no-store"}
#: A text no transport, Python or Ray error should ever put in front of a client.
LEAKS = ("Traceback", "RayActorError", "ActorDiedError", "AioRpcError", 'File "')
#: What the gateway says while a model has no live replica (all 503s with Retry-After).
RETRYABLE = {"model_unavailable", "model_not_ready"}


def live_replicas(app: str) -> dict[str, str]:
    """Name → actor id of each live Serve replica actor of `app`."""
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{app}#"
    alive = list_actors(
        filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False
    )
    return {str(a.name): a.actor_id for a in alive if (a.name or "").startswith(prefix)}


def kill_replica(app: str) -> str:
    """SIGKILL the one replica of `app` (Serve may start another); its actor id."""
    import ray

    [(name, actor_id)] = live_replicas(app).items()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return actor_id


def replaced(app: str, dead: str) -> bool:
    ids = set(live_replicas(app).values())
    return bool(ids) and dead not in ids


def assert_retryable(r: httpx.Response) -> None:
    """A 503 a client can act on: Retry-After and the error shape, nothing internal."""
    assert r.status_code == 503, (r.status_code, r.text[:500])
    assert int(r.headers["retry-after"]) >= 1
    error = r.json()["error"]
    assert set(error) == {"code", "message", "request_id"} and error["request_id"], error
    assert not any(leak in r.text for leak in LEAKS), r.text


def model_phase(client: httpx.Client, name: str) -> tuple[str, int]:
    models = {m["name"]: m for m in client.get("/v1/models/status").json()["models"]}
    return models[name]["phase"], models[name].get("ready_replicas", 0)


class Load:
    """Threads that POST `body` to `path` until stopped, keeping every answer or error."""

    def __init__(self, base_url: str, path: str, body: dict[str, Any], threads: int) -> None:
        self.base_url, self.path, self.body, self.threads = base_url, path, body, threads
        self.outcomes: list[tuple[float, httpx.Response | Exception]] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)

    def __enter__(self) -> Load:
        self._runs = [self._pool.submit(self._run) for _ in range(self.threads)]
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        waited = concurrent.futures.wait(self._runs, CLIENT_TIMEOUT_S + 10)
        self._pool.shutdown(wait=False)
        assert not waited.not_done, "a request never returned"
        for run in self._runs:
            run.result()  # a sender's own failure, if any

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, headers=FRESH, timeout=CLIENT_TIMEOUT_S) as c:
            while not self._stop.is_set():
                try:
                    outcome: httpx.Response | Exception = c.post(self.path, json=self.body)
                except httpx.HTTPError as exc:  # a timeout is a hang; a reset, a dropped call
                    outcome = exc
                self.outcomes.append((time.monotonic(), outcome))

    def served_since(self, since: float) -> int:
        return sum(1 for at, o in list(self.outcomes) if at > since and served(o))


def sse_errors(r: httpx.Response) -> list[dict[str, Any]]:
    """The `error` events of a server-sent event stream."""
    events = [e.splitlines() for e in r.text.split("\n\n") if e]
    return [
        json.loads(lines[1].removeprefix("data: "))["error"]
        for lines in events
        if lines[0] == "event: error"
    ]


def served(outcome: httpx.Response | Exception) -> bool:
    """A full answer: a 200, and for a stream no error event in it."""
    if not isinstance(outcome, httpx.Response) or outcome.status_code != 200:
        return False
    streamed = outcome.headers["content-type"].startswith("text/event-stream")
    return not (streamed and sse_errors(outcome))


def assert_answered_or_retryable(outcome: httpx.Response | Exception) -> None:
    """A 200 (a stream may end in an error event: a retryable one, then [DONE]) or a
    retryable 503; an exception here is a hang (timeout) or a dropped connection."""
    assert isinstance(outcome, httpx.Response), f"no answer: {outcome!r}"
    if outcome.status_code != 200:
        assert_retryable(outcome)
        assert outcome.json()["error"]["code"] in RETRYABLE, outcome.text
    elif outcome.headers["content-type"].startswith("text/event-stream"):
        assert outcome.text.endswith("data: [DONE]\n\n"), outcome.text[-300:]
        for error in sse_errors(outcome):
            assert error["code"] in RETRYABLE and error["request_id"], error
            assert not any(leak in error["message"] for leak in LEAKS), error


LOADS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "embeddings": ("minilm", "/v1/embeddings", {"input": ["a sentence", "and another"]}),
    "stream": ("demo-llm", "/v1/inference", {"prompt": "Once", "max_tokens": 64, "stream": True}),
}


@pytest.mark.parametrize("kind", LOADS)
def test_a_killed_model_replica_is_replaced_and_fails_requests_only_retryably(
    base_url: str, client: httpx.Client, kind: str
) -> None:
    model, path, body = LOADS[kind]
    body = {"model": model, **body}
    app = model_app_name(model)
    try:
        with Load(base_url, path, body, threads=3) as load:
            assert wait_for(lambda: load.served_since(0) >= 6, 60), load.outcomes[-3:]
            killed_at = time.monotonic()
            dead = kill_replica(app)
            assert wait_for(lambda: replaced(app, dead), REPLACED_WITHIN_S), live_replicas(app)
            # the load itself gets through again, with no help from the test
            assert wait_for(lambda: load.served_since(killed_at) >= 3, REPLACED_WITHIN_S)
        for _, outcome in load.outcomes:
            assert_answered_or_retryable(outcome)
        assert wait_for(lambda: model_phase(client, model) == ("Ready", 1), 60)
        for _ in range(4):
            assert served(client.post(path, json=body, headers=FRESH, timeout=CLIENT_TIMEOUT_S))
    finally:  # the session's other tests share the model: leave it serving
        assert wait_for(lambda: model_phase(client, model) == ("Ready", 1), REPLACED_WITHIN_S)


def test_a_model_killed_while_loading_leaves_the_others_serving(
    base_url: str, client: httpx.Client
) -> None:
    """SIGKILL of a new model's replica while its constructor loads the weights (a crash,
    an OOM kill): embeddings on another model under load get through all along, and the
    crashed model either loads again (Serve replaces the replica) or says why it failed,
    answering meanwhile only with retryable 503s."""
    name, app = "crash-while-loading", model_app_name("crash-while-loading")
    spec = {
        "name": name,
        "modelId": "builtin:demo-llm-58m",
        "task": "text-generation",
        "engine": "torch",
        "resources": {"cpus": 0.1},
        "generation": {"maxNewTokens": 8, "maxContextTokens": 128},
    }
    _, path, body = LOADS["embeddings"]
    body = {"model": "minilm", **body}
    try:
        with Load(base_url, path, body, threads=2) as load:
            assert wait_for(lambda: load.served_since(0) >= 4, 60), load.outcomes[-3:]
            assert client.post("/v1/models/load", json=spec).status_code == 202
            assert wait_for(lambda: bool(live_replicas(app)), 120), "no replica started"
            assert model_phase(client, name)[1] == 0  # still loading when killed
            killed_at = time.monotonic()
            dead = kill_replica(app)
            r = client.post("/v1/inference", json={"model": name, "prompt": "x"}, headers=FRESH)
            assert_retryable(r)
            assert wait_for(
                lambda: model_phase(client, name)[0] in ("Ready", "Failed"), REPLACED_WITHIN_S
            ), model_phase(client, name)
            assert load.served_since(killed_at) >= 2
        for _, outcome in load.outcomes:
            assert served(outcome), outcome
        phase, _ = model_phase(client, name)
        if phase == "Ready":  # loaded again in a new replica
            assert dead not in set(live_replicas(app).values())
            r = client.post("/v1/inference", json={"model": name, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text
        else:
            models = {m["name"]: m for m in client.get("/v1/models/status").json()["models"]}
            assert models[name]["message"], models[name]
    finally:
        client.post("/v1/models/unload", json={"name": name})


# ---- an index replica killed mid-upsert ------------------------------------------------
INDEX = "faults-kb"
#: Documents that exist before the interrupted write (edition A), and new ones it adds.
KEPT, ADDED = 30, 30


def _text(edition: str, sentences: int) -> str:
    """The same text for every document of an edition: one chunk count per edition."""
    return " ".join(
        f"Edition {edition}, sentence {n}: harbour cranes lift containers at dawn."
        for n in range(sentences)
    )


def _documents(edition: str, sentences: int) -> list[dict[str, Any]]:
    ids = [f"kept-{i}" for i in range(KEPT)]
    if edition == "B":
        ids += [f"added-{i}" for i in range(ADDED)]
    return [
        {"id": doc, "text": _text(edition, sentences), "metadata": {"edition": edition}}
        for doc in ids
    ]


@pytest.fixture(scope="module")
def index(base_url: str) -> Iterator[httpx.Client]:
    """A small-chunk index of this module's own, deleted (vectors too) at the end."""
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=CLIENT_TIMEOUT_S) as c:
        body = {
            "name": INDEX,
            "embeddingModel": "minilm",
            "chunking": {"maxTokens": 24, "overlap": 0},
            "reclaimPolicy": "Delete",
        }
        r = c.post("/v1/indexes", json=body)
        assert r.status_code == 202, r.text
        try:
            assert wait_for(lambda: _index_status(c) == "Ready", 240), _index_status(c)
            yield c
        finally:
            assert c.delete(f"/v1/indexes/{INDEX}").status_code == 200


def _index_status(c: httpx.Client) -> str | None:
    listed = {i["name"]: i["status"] for i in c.get("/v1/indexes").json()["data"]}
    return listed.get(INDEX)


def _stored(c: httpx.Client, doc: str) -> list[dict[str, Any]]:
    """Every chunk of `doc` in the index (by a filter on its id), in chunk order."""
    r = c.post(
        "/v1/data/search",
        json={"index": INDEX, "query": "harbour", "top_k": 1000, "filter": {"document_id": doc}},
    )
    assert r.status_code == 200, r.text
    return sorted(r.json()["hits"], key=lambda h: h["chunk_index"])


def _chunk_count(c: httpx.Client, text: str) -> int:
    r = c.post("/v1/data/clean", json={"text": text, "index": INDEX, "chunk": True})
    assert r.status_code == 200, r.text
    return len(r.json()["chunks"])


def _edition_of(c: httpx.Client, doc: str, counts: dict[str, int]) -> str | None:
    """The one edition `doc` holds wholly (all its chunks, 0..n-1); None when absent."""
    hits = _stored(c, doc)
    if not hits:
        return None
    editions = {h["metadata"]["edition"] for h in hits}
    assert len(editions) == 1, f"{doc} mixes editions {editions}"
    [edition] = editions
    positions = [h["chunk_index"] for h in hits]
    assert positions == list(range(counts[edition])), f"{doc} ({edition}) has chunks {positions}"
    return edition


def _upsert_in_thread(c: httpx.Client, docs: list[dict[str, Any]]) -> tuple[threading.Thread, list]:
    answer: list[httpx.Response | Exception] = []

    def send() -> None:
        try:
            answer.append(c.post("/v1/data/upsert", json={"index": INDEX, "documents": docs}))
        except httpx.HTTPError as exc:
            answer.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, answer


def test_an_index_replica_killed_mid_upsert_leaves_each_document_whole(
    index: httpx.Client,
) -> None:
    c, app = index, index_app_name(INDEX)
    began = time.monotonic()
    first = c.post("/v1/data/upsert", json={"index": INDEX, "documents": _documents("A", 4)})
    assert first.status_code == 200, first.text
    per_chunk_s = (time.monotonic() - began) / first.json()["chunks"]
    counts = {"A": first.json()["documents"][0]["chunks"]}
    second = _documents("B", 15)  # more chunks each: a mix of editions would show
    counts["B"] = _chunk_count(c, second[0]["text"])
    assert counts["B"] > counts["A"] > 1 and counts["B"] * len(second) < UPSERT_BATCH

    thread, answer = _upsert_in_thread(c, second)
    # a third of the way through: chunking is done, the embedding well under way
    time.sleep(max(0.3, per_chunk_s * counts["B"] * len(second) / 3))
    dead = kill_replica(app)
    thread.join(CLIENT_TIMEOUT_S + 5)
    assert answer and isinstance(answer[0], httpx.Response), f"no answer: {answer}"
    interrupted = answer[0]
    if interrupted.status_code != 200:
        assert_retryable(interrupted)
        assert interrupted.json()["error"]["code"].startswith("index_")
    assert wait_for(lambda: replaced(app, dead), REPLACED_WITHIN_S), live_replicas(app)
    assert wait_for(lambda: _index_status(c) == "Ready", REPLACED_WITHIN_S)

    editions = {d["id"]: _edition_of(c, d["id"], counts) for d in second}
    kept = {editions[d] for d in editions if d.startswith("kept")}
    added = {editions[d] for d in editions if d.startswith("added")}
    assert kept <= {"A", "B"} and added <= {None, "B"}, editions  # a kept one never vanishes
    if interrupted.status_code == 200:  # the kill came after the write: all of it is there
        assert kept | added == {"B"}, editions

    again = c.post("/v1/data/upsert", json={"index": INDEX, "documents": second})
    assert again.status_code == 200, again.text
    assert {d["chunks"] for d in again.json()["documents"]} == {counts["B"]}
    for doc in second:
        assert _edition_of(c, doc["id"], counts) == "B"
