"""Names and paths from users never reach the file system or an API path unchecked.

Model roots, collection names, the Kubernetes store's API paths and the hub cache, each
tried with what an attacker holding `models:admin` (or write access to the CRs) would
send; and the defence in depth below the validators, handed names the specs refuse.
"""

from __future__ import annotations

import builtins
import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from fastapi.testclient import TestClient
from stub_http import recording_qdrant
from support import AUTH

from dify_operator.reclaim import reclaim_index
from dify_serving.catalog.kubernetes import KubernetesModelStore
from dify_serving.engines import weights
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.knowledge.backends import open_backend
from dify_serving.kube import InvalidName, KubernetesUnavailable, cluster_access
from dify_serving.options import GatewayOptions, ModelSourceOptions
from dify_serving.specs import (
    DifyIndexSpec,
    DifyModel,
    DifyModelSpec,
    ObjectMeta,
)


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


def test_reclaim_of_an_embedded_index_on_the_global_qdrant_drops_its_collection(
    home: Path,
) -> None:
    """With DIFY_MIRROR_QDRANT_URL set the index's vectors are on that server, not on disk."""
    with recording_qdrant() as (url, deletes):
        said = reclaim_index("kb", _index_spec(), str(home), qdrant_url=url)
    assert deletes == ["/collections/kb"] and "dropped" in said
    assert (home / "indexes" / "kb" / "segment").exists()  # another deployment's shard
    assert reclaim_index("kb", _index_spec(), str(home), qdrant_url=None).startswith("embedded")
    assert not (home / "indexes" / "kb").exists()


def test_open_backend_refuses_a_collection_that_is_a_path(home: Path) -> None:
    with pytest.raises(ValueError, match="RFC 1123"):
        open_backend("kb", _index_spec(collection="../victim"), home)
    with pytest.raises(ValueError, match="RFC 1123"):
        open_backend("../victim", _index_spec(), home)


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
    with pytest.raises(InvalidName, match="namespace"):
        KubernetesModelStore(api="http://127.0.0.1:1", token="t", namespace="../kube-system")


def test_the_store_and_the_audit_checkpoint_reach_the_cluster_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One discovery of the API server, token and namespace (`cluster_access`) for both."""
    from dify_serving.security.audit.checkpoint import CheckpointPlaces, ConfigMapCheckpoint

    monkeypatch.delenv("DIFY_MIRROR_KUBE_API", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.9")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    monkeypatch.setenv("DIFY_MIRROR_KUBE_TOKEN", "sa-token")
    monkeypatch.setenv("DIFY_MIRROR_NAMESPACE", "serving")
    access = cluster_access()
    assert (access.api, access.namespace, access.token) == (
        "https://10.0.0.9:6443",
        "serving",
        "sa-token",
    )
    assert "sa-token" not in repr(access)
    store = KubernetesModelStore()
    assert (store.api, store.namespace) == (access.api, access.namespace)
    assert store._client.headers["Authorization"] == "Bearer sa-token"
    places = CheckpointPlaces.detect(Path("/nonexistent"), configmap="cm")
    assert (places.kube_api, places.namespace) == (access.api, access.namespace)
    checkpoint = ConfigMapCheckpoint(places.kube_api or "", places.namespace, "cm")
    assert checkpoint.url == "https://10.0.0.9:6443/api/v1/namespaces/serving/configmaps/cm"
    assert checkpoint._client.headers["Authorization"] == "Bearer sa-token"
    checkpoint.close()
    monkeypatch.setenv("DIFY_MIRROR_NAMESPACE", "Not/A-Name")
    for build in (cluster_access, KubernetesModelStore):
        with pytest.raises(InvalidName, match="namespace"):
            build()


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


@pytest.mark.parametrize("relative", ["./models/m", "~/models/m", "models/m"])
def test_a_local_model_id_must_be_absolute(
    relative: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`./x` and `~/x` name one folder to the gateway and another to each replica (their
    working directory and user differ): only absolute paths are local weights."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    roots = [tmp_path / "models"]
    with pytest.raises(weights.WeightsNotFound, match="absolute"):
        weights.check_local(relative, roots)
    assert weights.check_local(str(tmp_path / "models" / "m"), roots) == tmp_path / "models" / "m"


def _watch_file_system(monkeypatch: pytest.MonkeyPatch, watched: list[str]) -> list[str]:
    """Record, for this test only, every look (open, stat, lstat, listing) at paths under
    `watched`; pathlib and os.path reach the file system through these same functions."""
    seen: list[str] = []

    def watching(original: Any) -> Any:
        def look(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, os.PathLike)):
                text = str(os.fspath(path))
                if any(text.startswith(w) for w in watched):
                    seen.append(text)
            return original(path, *args, **kwargs)

        return look

    for module, name in (
        (builtins, "open"),
        (io, "open"),
        (os, "open"),
        (os, "stat"),
        (os, "lstat"),
        (os, "listdir"),
        (os, "scandir"),
    ):
        monkeypatch.setattr(module, name, watching(getattr(module, name)))
    return seen


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
    replies = {}
    with monkeypatch.context() as watch:
        seen = _watch_file_system(watch, ["/etc", missing])
        for path in ("/etc", "/etc/../etc/ssl", missing):
            replies[path] = gateway.post(
                "/v1/models/load", json={"name": "x", "modelId": path}, headers=AUTH
            )
        looked = list(seen)
        Path("/etc/hostname").exists()  # the watch itself works
        assert seen[len(looked) :] == ["/etc/hostname"]
    assert looked == []
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


def test_load_refuses_versions_whose_weights_do_not_sum_to_100(gateway: TestClient) -> None:
    versions = [{"name": "v1", "modelId": "m1", "weight": 60}, {"name": "v2", "modelId": "m2"}]
    r = gateway.post(
        "/v1/models/load", json={"name": "x", "modelId": "m", "versions": versions}, headers=AUTH
    )
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert message.startswith("versions:") and "v1=60, v2=0 sum to 60, not 100" in message


def test_load_checks_every_versions_local_path(gateway: TestClient, tmp_path: Path) -> None:
    inside = str(tmp_path / "models" / "x")
    versions = [
        {"name": "v1", "modelId": inside, "weight": 50},
        {"name": "v2", "modelId": "/etc/ssl", "weight": 50},
    ]
    r = gateway.post(
        "/v1/models/load", json={"name": "x", "modelId": inside, "versions": versions}, headers=AUTH
    )
    assert r.status_code == 422
    assert "model roots" in r.json()["error"]["message"]


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
    allowed = ModelSourceOptions(hub_downloads=True)  # from_pretrained gets the hub id
    assert weights.resolve("someorg/not-cached", tmp_path, allowed) == "someorg/not-cached"
