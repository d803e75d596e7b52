"""Indexes over HTTP: `POST /v1/indexes`, `DELETE /v1/indexes/{name}` on one machine.

In-process gateways (`gateways.py`) apply their changes to a stand-in Ray dashboard on a
real port (`serve_dashboard.py`), read back to see what the gateway asked Serve to run.
The real stack does the same over real Serve in `tests/stack/test_index_lifecycle.py`;
the cluster's path (DifyIndex objects, the operator's reclaim) is
`tests/operator/test_index_objects.py`.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from fastapi.testclient import TestClient
from gateways import audit_rows, close_all, gateway, new_key
from serve_dashboard import ServeDashboard
from stub_http import recording_qdrant
from support import AUTH, index_doc, model_doc

from dify_serving.catalog import local as local_catalog
from dify_serving.catalog.files import LocalStateStore
from dify_serving.layout import index_shard_dir, index_shard_lock, index_write_journal
from dify_serving.manifests import parse_documents
from dify_serving.options import ServeOptions

MINILM = model_doc("minilm", "sentence-transformers/all-MiniLM-L6-v2", "feature-extraction")
LLM = model_doc("demo-llm", "builtin:demo-llm", "text-generation")


@pytest.fixture()
def serve() -> Iterator[ServeDashboard]:
    dashboard = ServeDashboard()
    yield dashboard
    dashboard.close()


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    LocalStateStore(tmp_path).save(parse_documents([MINILM, LLM]), ServeOptions())
    yield tmp_path
    close_all()


@pytest.fixture()
def client(home: Path, serve: ServeDashboard) -> Iterator[TestClient]:
    with gateway(home, dashboard_url=serve.url) as http:  # one loop: reclaims run on
        http.app.state.gateway.status.cluster_gpus = 0.0  # type: ignore[attr-defined]
        yield http


def _vectors(home: Path, collection: str) -> Path:
    """A shard folder as the index replica leaves it."""
    shard = index_shard_dir(home, collection)
    (shard / "segments").mkdir(parents=True, exist_ok=True)
    (shard / "segments" / "0").write_text("vectors")
    return shard


def _create(client: TestClient, name: str, headers: Any = AUTH, **spec: Any) -> Any:
    body = {"name": name, "embeddingModel": "minilm", **spec}
    return client.post("/v1/indexes", json=body, headers=headers)


def _listed(client: TestClient) -> dict[str, dict[str, Any]]:
    r = client.get("/v1/indexes", headers=AUTH)
    assert r.status_code == 200, r.text
    return {i["name"]: i for i in r.json()["data"]}


def test_create_lists_applies_and_delete_reclaims_the_vectors(
    client: TestClient, home: Path, serve: ServeDashboard
) -> None:
    r = _create(client, "kb", reclaimPolicy="Delete", chunking={"maxTokens": 128})
    assert r.status_code == 202, r.text
    assert r.json() == {
        "name": "kb",
        "phase": "Loading",
        "message": "Loading: starting its replica",
        "status_url": "/v1/indexes",
    }
    assert "index-kb" in serve.names()  # rendered and applied with the rest
    stored = LocalStateStore(home).load()[0].indexes["kb"].spec
    assert (stored.chunking.max_tokens, stored.reclaim_policy) == (128, "Delete")
    listed = _listed(client)["kb"]
    assert (listed["model"], listed["collection"], listed["status"]) == ("minilm", "kb", "Loading")

    shard = _vectors(home, "kb")
    journal = index_write_journal(home, "kb")  # a write a killed replica left: goes too
    journal.write_text('{"documents": {}}')
    serve.linger_s = 0.5  # Serve lists the app as DELETING while its replica stops
    started = time.monotonic()
    r = client.delete("/v1/indexes/kb", headers=AUTH)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started >= 0.5  # it waited for the app to go first
    assert r.json() == {
        "name": "kb",
        "phase": "Deleted",
        "reclaim_policy": "Delete",
        "vectors": "deleted",
        "message": "collection kb removed",
    }
    assert not shard.exists() and not journal.exists() and "index-kb" not in serve.names()
    assert "kb" not in _listed(client)
    r = client.post("/v1/data/search", json={"index": "kb", "query": "x"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"
    assert "'kb' does not exist" in r.json()["error"]["message"]
    r = client.delete("/v1/indexes/kb", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"
    rows = [row for row in audit_rows(client) if row["route"] == "/v1/indexes/{name}"]
    assert [row["status"] for row in rows] == [200, 404]
    assert "vectors deleted" in rows[0]["detail"]


def test_retain_keeps_the_vectors_for_an_index_created_again(
    client: TestClient, home: Path
) -> None:
    assert _create(client, "kb").status_code == 202  # Retain is the default
    shard = _vectors(home, "kb")
    r = client.delete("/v1/indexes/kb", headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["reclaim_policy"], r.json()["vectors"]) == ("Retain", "retained")
    assert (shard / "segments" / "0").read_text() == "vectors"
    assert "kb" not in LocalStateStore(home).load()[0].indexes
    assert _create(client, "kb").status_code == 202
    assert (shard / "segments" / "0").read_text() == "vectors"


def test_vectors_go_only_once_the_replica_lets_go_of_them(
    client: TestClient, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that still holds the shard's lock keeps its folder; the request answers
    202, a create of the same name is 409 meanwhile, and the folder goes once it lets go."""
    monkeypatch.setattr(local_catalog, "RECLAIM_WAIT_S", 0.5)
    assert _create(client, "kb", reclaimPolicy="Delete").status_code == 202
    shard = _vectors(home, "kb")
    with open(index_shard_lock(home, "kb"), "w") as replica:
        fcntl.flock(replica, fcntl.LOCK_EX)
        r = client.delete("/v1/indexes/kb", headers=AUTH)
        assert r.status_code == 202, r.text
        assert (r.json()["phase"], r.json()["vectors"]) == ("Deleting", "deleting")
        again = _create(client, "kb", reclaimPolicy="Delete")
        assert again.status_code == 409 and "being deleted" in again.json()["error"]["message"]
        time.sleep(0.5)
        assert (shard / "segments" / "0").exists()
    deadline = time.monotonic() + 10
    while shard.exists():
        assert time.monotonic() < deadline, "the shard was not reclaimed"
        time.sleep(0.05)
    assert _create(client, "kb").status_code == 202


def test_an_index_without_an_embedding_model_is_accepted_and_says_why(
    client: TestClient, serve: ServeDashboard
) -> None:
    r = _create(client, "waits", embeddingModel="not-yet")
    assert r.status_code == 202, r.text
    assert r.json()["phase"] == "Pending" and "'not-yet' does not exist" in r.json()["message"]
    r = _create(client, "wrong", embeddingModel="demo-llm")
    assert r.status_code == 202, r.text
    assert r.json()["phase"] == "Failed"
    assert "text-generation, not feature-extraction" in r.json()["message"]
    assert not {"index-waits", "index-wrong"} & serve.names()  # nothing to run yet
    listed = _listed(client)
    assert listed["waits"]["status"] == "Pending" and listed["wrong"]["status"] == "Failed"
    assert client.delete("/v1/indexes/waits", headers=AUTH).status_code == 200


def test_a_create_never_replaces(client: TestClient, home: Path) -> None:
    assert _create(client, "kb", chunking={"maxTokens": 64, "overlap": 8}).status_code == 202
    r = _create(client, "kb", chunking={"maxTokens": 256})
    assert r.status_code == 409 and r.json()["error"]["code"] == "index_exists", r.text
    assert "DELETE /v1/indexes/kb first" in r.json()["error"]["message"]
    assert LocalStateStore(home).load()[0].indexes["kb"].spec.chunking.max_tokens == 64
    r = _create(client, "kb2", store={"collection": "kb"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "collection_in_use", r.text
    assert "'kb2' would share collection 'kb' with index 'kb'" in r.json()["error"]["message"]
    assert "kb2" not in LocalStateStore(home).load()[0].indexes


BAD_SPECS = [
    ({"name": "KB", "embeddingModel": "minilm"}, "name"),
    ({"name": "../kb", "embeddingModel": "minilm"}, "name"),
    ({"name": "x" * 64, "embeddingModel": "minilm"}, "name"),
    ({"embeddingModel": "minilm"}, "name"),
    ({"name": "kb"}, "embeddingModel"),
    ({"name": "kb", "embeddingModel": "minilm", "colour": "red"}, "colour"),
    ({"name": "kb", "embeddingModel": "minilm", "chunking": {"maxTokens": 1024}}, "512"),
    ({"name": "kb", "embeddingModel": "minilm", "chunking": {"overlap": 600}}, "overlap"),
    ({"name": "kb", "embeddingModel": "minilm", "store": {"type": "qdrant"}}, "store.url"),
    ({"name": "kb", "embeddingModel": "minilm", "store": {"collection": "../x"}}, "collection"),
    ({"name": "kb", "embeddingModel": "minilm", "filterableFields": ["f"] * 65}, "filterable"),
    ({"name": "kb", "embeddingModel": "minilm", "reclaimPolicy": "Recycle"}, "reclaimPolicy"),
]


def test_a_bad_spec_or_name_is_422_naming_the_field(client: TestClient, home: Path) -> None:
    for body, needle in BAD_SPECS:
        r = client.post("/v1/indexes", json=body, headers=AUTH)
        assert r.status_code == 422, r.text
        assert needle in r.json()["error"]["message"], r.text
    assert LocalStateStore(home).load()[0].indexes == {}
    for name in ("KB", "a_b", "x" * 64, "-kb"):  # never a path, an app or a folder name
        r = client.delete(f"/v1/indexes/{name}", headers=AUTH)
        assert r.status_code == 422 and "name" in r.json()["error"]["message"], r.text


def test_scopes_both_needed_and_confined_keys(client: TestClient) -> None:
    for scopes, missing in ((["data:write"], "models:admin"), (["models:admin"], "data:write")):
        key = new_key(client, scopes=scopes)
        r = _create(client, "kb", headers=key["headers"])
        assert r.status_code == 403 and missing in r.json()["error"]["message"], r.text
        r = client.delete("/v1/indexes/kb", headers=key["headers"])
        assert r.status_code == 403 and missing in r.json()["error"]["message"], r.text
    both = ["data:write", "models:admin"]
    confined = new_key(client, scopes=both, indexes=["team-*"], models=["minilm"])
    r = _create(client, "other-kb", headers=confined["headers"])
    assert r.status_code == 403 and "index 'other-kb'" in r.json()["error"]["message"]
    r = _create(client, "team-kb", headers=confined["headers"], embeddingModel="demo-llm")
    assert r.status_code == 403 and "model 'demo-llm'" in r.json()["error"]["message"]
    assert _create(client, "team-kb", headers=confined["headers"]).status_code == 202
    assert _create(client, "other-kb").status_code == 202
    r = client.delete("/v1/indexes/other-kb", headers=confined["headers"])
    assert r.status_code == 403  # before existence: a confined key learns nothing of it
    assert client.delete("/v1/indexes/team-kb", headers=confined["headers"]).status_code == 200


def test_keys_with_a_second_factor_must_give_it(client: TestClient) -> None:
    guard = client.app.state.guard  # type: ignore[attr-defined]
    created = guard.keys.create("ops", ["data:write", "models:admin"], totp=True)
    headers = {"Authorization": f"Bearer {created.key}"}
    r = _create(client, "kb", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "second_factor_required"
    r = client.delete("/v1/indexes/kb", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "second_factor_required"
    code = pyotp.TOTP(created.totp_secret).now()
    r = _create(client, "kb", headers={**headers, "X-Dify-OTP": code})
    assert r.status_code == 202, r.text
    # the rules, as /docs shows them
    paths = client.get("/openapi.json").json()["paths"]
    create = paths["/v1/indexes"]["post"]["x-dify-rule"]
    delete = paths["/v1/indexes/{name}"]["delete"]["x-dify-rule"]
    for rule in (create, delete):
        assert sorted(rule["scopes"]) == ["data:write", "models:admin"] and rule["sensitive"]
    assert paths["/v1/indexes"]["get"]["x-dify-rule"]["scopes"] == ["data:read"]


def test_without_serve_a_change_is_a_clear_503(home: Path) -> None:
    client = gateway(home)  # no Ray dashboard to apply to
    r = _create(client, "kb")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_control", r.text


def test_the_state_survives_a_new_gateway(home: Path, serve: ServeDashboard) -> None:
    """What the API created is in the state file: another gateway replica sees it."""
    with gateway(home, dashboard_url=serve.url) as first:
        assert _create(first, "kb").status_code == 202
    with gateway(home, dashboard_url=serve.url) as second:
        second.app.state.gateway.status.cluster_gpus = 0.0  # type: ignore[attr-defined]
        assert "kb" in _listed(second)
        assert _create(second, "kb").status_code == 409


def test_index_doc_and_the_api_give_the_same_spec(client: TestClient, home: Path) -> None:
    spec = {"chunking": {"maxTokens": 64, "overlap": 8}, "filterableFields": ["lang"]}
    assert _create(client, "kb", **spec).status_code == 202
    from_api = LocalStateStore(home).load()[0].indexes["kb"]
    from_file = parse_documents([index_doc("kb", "minilm", **spec)]).indexes["kb"]
    assert from_api.spec == from_file.spec


def test_delete_drops_the_collection_on_the_qdrant_server_it_used(
    tmp_path: Path, serve: ServeDashboard
) -> None:
    """With `DIFY_MIRROR_QDRANT_URL` an embedded index lives on that server: the reclaim
    drops its collection there, and leaves a shard folder of the same name alone."""
    try:
        with recording_qdrant() as (url, deletes):
            state = parse_documents([MINILM])
            LocalStateStore(tmp_path).save(state, ServeOptions(qdrant_url=url))
            with gateway(tmp_path, dashboard_url=serve.url) as client:
                assert _create(client, "kb", reclaimPolicy="Delete").status_code == 202
                shard = _vectors(tmp_path, "kb")  # not this index's: on the server instead
                r = client.delete("/v1/indexes/kb", headers=AUTH)
            assert r.status_code == 200 and r.json()["vectors"] == "deleted", r.text
            assert deletes == ["/collections/kb"] and shard.exists()
    finally:
        close_all()
