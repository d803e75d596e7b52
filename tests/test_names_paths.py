"""Names and paths from users never reach the file system or an API path unchecked.

Model roots, collection names, the Kubernetes store's API paths and the hub cache, each
tried with what an attacker holding `models:admin` (or write access to the CRs) would
send; and the defence in depth below the validators, handed names the specs refuse.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from conftest import API_KEY
from fastapi.testclient import TestClient

from dify_operator.reclaim import reclaim_index
from dify_serving.engines import weights
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.knowledge.stores import open_store
from dify_serving.options import GatewayOptions, ModelSourceOptions
from dify_serving.specs import (
    VERSIONS_REFUSED,
    DifyIndexSpec,
    DifyModel,
    DifyModelSpec,
    ObjectMeta,
)
from dify_serving.store.kubernetes import (
    InvalidName,
    KubernetesModelStore,
    KubernetesUnavailable,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _index_spec(**store: Any) -> DifyIndexSpec:
    spec = DifyIndexSpec.model_validate({"embeddingModel": "e"})
    for key, value in store.items():  # bypasses validation, as a bug upstream would
        setattr(spec.store, key, value)
    return spec


# reclaim ---------------------------------------------------------------------------------
@pytest.fixture()
def home(tmp_path: Path) -> Path:
    (tmp_path / "indexes" / "kb").mkdir(parents=True)
    (tmp_path / "indexes" / "kb" / "segment").write_text("vectors")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep").write_text("not an index")
    return tmp_path


@pytest.mark.parametrize(
    ("name", "collection"),
    [("kb", "../victim"), ("../victim", None), ("kb", ".."), ("kb", "kb/../../victim")],
)
def test_reclaim_never_removes_outside_the_index_folder(
    home: Path, name: str, collection: str | None
) -> None:
    with pytest.raises(kopf.PermanentError, match="not reclaimed"):
        reclaim_index(name, _index_spec(collection=collection), str(home))
    assert (home / "victim" / "keep").read_text() == "not an index"
    assert (home / "indexes" / "kb" / "segment").exists()


def test_reclaim_removes_a_link_not_what_it_points_to(home: Path) -> None:
    (home / "indexes" / "linked").symlink_to(home / "victim")
    reclaim_index("linked", _index_spec(), str(home))
    assert not (home / "indexes" / "linked").exists()
    assert (home / "victim" / "keep").exists()
    reclaim_index("kb", _index_spec(), str(home))
    assert not (home / "indexes" / "kb").exists()


def test_reclaim_on_qdrant_calls_only_http_urls(home: Path) -> None:
    spec = _index_spec(type="qdrant", url="file:///etc", collection="kb")
    with pytest.raises(kopf.PermanentError, match="http"):
        reclaim_index("kb", spec, str(home))
    spec = _index_spec(type="qdrant", url="http://127.0.0.1:9", collection="../../aliases")
    with pytest.raises(kopf.PermanentError, match="not reclaimed"):
        reclaim_index("kb", spec, str(home))


def test_open_store_refuses_a_collection_that_is_a_path(home: Path) -> None:
    with pytest.raises(ValueError, match="RFC 1123"):
        open_store("kb", _index_spec(collection="../victim"), home)
    with pytest.raises(ValueError, match="RFC 1123"):
        open_store("../victim", _index_spec(), home)


# the Kubernetes store --------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio
async def test_kubernetes_store_builds_api_paths_from_valid_names_only() -> None:
    store = KubernetesModelStore(
        api=f"http://127.0.0.1:{_closed_port()}", token="t", namespace="default"
    )
    for name in ("../../../api/v1/namespaces/default/secrets/x", "a/b", "A", "x" * 64, ""):
        assert await store.delete(name) is False  # no request: nothing by that name can exist
    with pytest.raises(KubernetesUnavailable):  # a valid name does reach the (closed) API
        await store.delete("demo-llm")
    bad = DifyModel.model_construct(
        metadata=ObjectMeta.model_construct(name="../secrets"),
        spec=DifyModelSpec.model_validate({"modelId": "m"}),
    )
    with pytest.raises(InvalidName):
        await store.put(bad)
    with pytest.raises(KubernetesUnavailable, match="namespace"):
        KubernetesModelStore(api="http://127.0.0.1:1", token="t", namespace="../kube-system")


# model roots --------------------------------------------------------------------------------
def test_outside_the_roots_reads_the_same_whether_or_not_it_exists(tmp_path: Path) -> None:
    roots = [tmp_path / "models"]
    missing = tmp_path / "no-such-folder"
    messages = []
    for path in ("/etc", str(missing)):
        with pytest.raises(weights.WeightsNotFound) as info:
            weights.check_local(path, roots)
        messages.append(str(info.value).replace(repr(path), "PATH"))
    assert messages[0] == messages[1]
    inside = tmp_path / "models" / "m"
    assert weights.check_local(str(inside), roots) == inside
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "escape").symlink_to("/etc")
    with pytest.raises(weights.WeightsNotFound):  # a link inside that points outside
        weights.check_local(str(tmp_path / "models" / "escape"), roots)
    assert weights.check_local(str(tmp_path / "models" / "escape"), roots, follow_links=False)


class _Probe:
    """Records every file-system look at paths under `watched` (stat, lstat, open, list)."""

    def __init__(self, watched: list[str]) -> None:
        self.watched, self.seen, self.active = watched, [], False

    def _note(self, path: Any) -> None:
        if self.active and isinstance(path, (str, os.PathLike)):
            text = os.fspath(path)
            if any(str(text).startswith(w) for w in self.watched):
                self.seen.append(text)

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event in ("open", "os.listdir", "os.scandir") and args:
            self._note(args[0])


_PROBE = _Probe([])
sys.addaudithook(_PROBE.audit)


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[TestClient]:
    options = GatewayOptions(
        home=str(tmp_path), sources=ModelSourceOptions(roots=[str(tmp_path / "models")])
    )
    app = create_app(GatewayState(options))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    app.state.guard.close()


def test_load_refuses_paths_outside_the_roots_without_looking_at_them(
    gateway: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "elsewhere" / "missing")
    _PROBE.watched, _PROBE.seen = ["/etc", missing], []
    stat, lstat = os.stat, os.lstat

    def watched_stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        _PROBE._note(path)
        return stat(path, *args, **kwargs)

    def watched_lstat(path: Any, *args: Any, **kwargs: Any) -> Any:
        _PROBE._note(path)
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", watched_stat)
    monkeypatch.setattr(os, "lstat", watched_lstat)
    replies = {}
    _PROBE.active = True
    try:
        for path in ("/etc", "/etc/../etc/ssl", missing):
            replies[path] = gateway.post(
                "/v1/models/load", json={"name": "x", "modelId": path}, headers=AUTH
            )
    finally:
        _PROBE.active = False
    assert _PROBE.seen == []
    bodies = {p: r.json()["error"] for p, r in replies.items()}
    assert {r.status_code for r in replies.values()} == {422}
    texts = {b["message"].replace(repr(p), "PATH") for p, b in bodies.items()}
    assert len(texts) == 1, texts  # an existing folder and a missing one read the same
    assert "model roots" in texts.pop()
    inside = gateway.post(
        "/v1/models/load",
        json={"name": "x", "modelId": str(tmp_path / "models" / "x")},
        headers=AUTH,
    )
    assert inside.status_code != 422  # past the check (this gateway then has no Ray: 503)


def test_load_refuses_versions_until_switching_exists(gateway: TestClient) -> None:
    r = gateway.post(
        "/v1/models/load",
        json={"name": "x", "modelId": "m", "versions": [{"name": "v2", "modelId": "m2"}]},
        headers=AUTH,
    )
    assert r.status_code == 422
    assert r.json()["error"]["message"] == f"versions: {VERSIONS_REFUSED}"


# the hub ------------------------------------------------------------------------------------
def _fake_cache(root: Path, repo: str, commit: str = "a" * 40) -> Path:
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_hub_ids_come_from_the_local_cache_only_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the app must not rely on it
    connects: list[Any] = []
    original = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        connects.append(address)
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(weights.WeightsNotFound, match="DIFY_MIRROR_HUB_DOWNLOADS=true"):
        weights.resolve("someorg/not-cached", tmp_path, ModelSourceOptions())
    assert connects == []
    snapshot = _fake_cache(tmp_path / "hub", "someorg/cached")
    assert weights.resolve("someorg/cached", tmp_path, ModelSourceOptions()) == str(snapshot)
    with pytest.raises(weights.WeightsNotFound):  # a revision that is not cached
        weights.resolve("someorg/cached", tmp_path, ModelSourceOptions(), revision="v2")
    allowed = ModelSourceOptions(hub_downloads=True)
    assert weights.resolve("someorg/not-cached", tmp_path, allowed) == "someorg/not-cached"
    assert connects == []
