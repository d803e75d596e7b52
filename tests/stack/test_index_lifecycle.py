"""An index created and deleted over HTTP on the real local stack (Serve, Qdrant Edge).

One index name, twice: created with `reclaimPolicy: Retain`, filled, deleted (its shard
stays on disk), created again with `Delete` — it finds its vectors — and deleted again:
its replica leaves Serve, then its shard folder goes, and a search is a clear 404.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from dify_serving.layout import index_shard_dir

NAME = "lifecycle-kb"
DOCS = [
    {"id": "lava", "text": "Volcanoes erupt molten lava; ash clouds ground aeroplanes."},
    {"id": "bread", "text": "Sourdough rises slowly with wild yeast and a hot oven."},
]


def _create(client: httpx.Client, policy: str) -> None:
    body = {"name": NAME, "embeddingModel": "minilm", "reclaimPolicy": policy}
    r = client.post("/v1/indexes", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["status_url"] == "/v1/indexes"
    deadline = time.monotonic() + 180
    while True:  # listed at once, with its phase; Ready once its replica runs
        listed = {i["name"]: i for i in client.get("/v1/indexes").json()["data"]}
        assert NAME in listed
        if listed[NAME]["status"] == "Ready":
            return
        assert listed[NAME]["status"] in ("Pending", "Loading"), listed[NAME]
        assert time.monotonic() < deadline, f"{NAME} never became Ready: {listed[NAME]}"
        time.sleep(0.5)


def _search(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/data/search", json={"index": NAME, "query": "volcano ash", "top_k": 1})


def _hits(client: httpx.Client) -> list[dict[str, Any]]:
    r = _search(client)
    assert r.status_code == 200, r.text
    hits: list[dict[str, Any]] = r.json()["hits"]
    return hits


def test_create_fill_delete_retain_then_delete(client: httpx.Client, stack: Any) -> None:
    shard = index_shard_dir(stack.settings.state_dir, NAME)
    _create(client, "Retain")
    r = client.post("/v1/data/upsert", json={"index": NAME, "documents": DOCS})
    assert r.status_code == 200, r.text
    assert _hits(client)[0]["document_id"] == "lava"
    assert (
        client.post("/v1/indexes", json={"name": NAME, "embeddingModel": "minilm"}).status_code
        == 409
    )

    r = client.delete(f"/v1/indexes/{NAME}")
    assert r.status_code == 200, r.text
    assert (r.json()["vectors"], r.json()["reclaim_policy"]) == ("retained", "Retain")
    assert _search(client).status_code == 404
    assert shard.is_dir()

    _create(client, "Delete")  # the same name finds its vectors again
    assert _hits(client)[0]["document_id"] == "lava"

    r = client.delete(f"/v1/indexes/{NAME}")
    assert r.status_code == 200, r.text
    assert (r.json()["vectors"], r.json()["phase"]) == ("deleted", "Deleted")
    assert f"index-{NAME}" not in stack.dashboard.get_applications()["applications"]
    assert not shard.exists()
    r = _search(client)
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"
    assert NAME not in {i["name"] for i in client.get("/v1/indexes").json()["data"]}
    assert client.delete(f"/v1/indexes/{NAME}").status_code == 404
