"""Reclaim an index's vectors when it is deleted with `reclaimPolicy: Delete`.

One rule for both actuators: the operator's delete handler in a cluster
(`dify_operator/reclaim.py` turns these errors into kopf's) and `LocalCatalog` on one
machine (`DELETE /v1/indexes/{name}`). The vectors are where the index replica opened
them (`specs.store_address`, the rule `open_backend` follows): a collection of a Qdrant
server, its own `store.url` or the deployment's `DIFY_MIRROR_QDRANT_URL`, else a shard
folder (`layout.index_shard_dir`).

The collection name becomes a folder or a segment of a Qdrant URL, so it is checked again
here, whatever validated it before: a name that is not an RFC 1123 label, or a folder
that would not sit directly under `home/indexes`, is refused for good rather than removed.

An embedded shard is removed while holding the shard's lock (`layout.index_shard_lock`),
the one the index replica holds for its life: no writer has the folder open while it
goes, and a replica of a re-created index waits until it is gone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import httpx

from dify_serving.errors import DifyError
from dify_serving.layout import (
    index_shard_dir,
    index_shard_lock,
    index_shards_root,
    index_write_journal,
)
from dify_serving.specs import DifyIndexSpec, is_name, qdrant_server, store_address

#: Seconds `reclaim_vectors` waits for a replica still stopping to let go of the shard.
LOCK_WAIT_S = 60.0


class ReclaimRefused(DifyError):
    """The vectors will never be removed by this rule (a name that is not a folder name,
    a URL that is not http(s)): retrying cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__(409, "reclaim_refused", message)


class ReclaimPending(DifyError):
    """The vectors cannot be removed now (Qdrant down, the shard still held): retry."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "reclaim_pending", message, {"Retry-After": "2"})


def reclaim_vectors(
    name: str,
    spec: DifyIndexSpec,
    home: str | Path,
    qdrant_url: str | None = None,
    lock_wait_s: float = LOCK_WAIT_S,
) -> str:
    """Drop the collection (Qdrant server) or the on-disk shard (embedded); say what went.

    Raises:
        ReclaimRefused: the collection or URL is not one this rule may touch.
        ReclaimPending: Qdrant refused or cannot be reached, or a replica still holds
            the shard after `lock_wait_s`.
    """
    collection = spec.store.collection or name
    if not is_name(collection):
        raise ReclaimRefused(
            f"not reclaimed: collection {collection[:80]!r} is not a lower-case RFC 1123 name"
        )
    url = store_address(spec, qdrant_url)
    if url is not None or spec.store.type == "qdrant":
        return _drop_collection(url or "", collection)
    root = Path(os.path.abspath(index_shards_root(home)))
    shard = Path(os.path.abspath(index_shard_dir(home, collection)))
    if shard.parent != root:
        raise ReclaimRefused(f"not reclaimed: {collection!r} is not a folder of {root}")
    if not shard.is_symlink() and not shard.exists():
        return f"embedded collection {collection} had no vectors under {root}"
    with open(index_shard_lock(home, collection), "a") as lock:
        _hold(lock, collection, lock_wait_s)
        if shard.is_symlink():  # the link goes, never what it points to
            shard.unlink()
        else:
            shutil.rmtree(shard, ignore_errors=True)
        index_write_journal(home, collection).unlink(missing_ok=True)
    return f"embedded collection {collection} removed from {root}"


def _hold(lock: IO[str], collection: str, wait_s: float) -> None:
    """Take the shard's exclusive lock, waiting for a replica that is stopping."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ReclaimPending(
                    f"not reclaimed yet: a replica still holds collection {collection} "
                    f"after {wait_s:g}s"
                ) from None
            time.sleep(0.1)


def _drop_collection(url: str, collection: str) -> str:
    if urlsplit(url).scheme not in ("http", "https"):
        raise ReclaimRefused("not reclaimed: the store URL is not an http(s) URL")
    server = qdrant_server(url)  # the port qdrant-client would use, 6333 when none is written
    try:
        response = httpx.delete(f"{server}/collections/{collection}", timeout=10)
    except httpx.HTTPError as exc:
        raise ReclaimPending(f"Qdrant unreachable: {exc}") from exc
    if response.status_code not in (200, 404):
        raise ReclaimPending(f"Qdrant refused to drop {collection}: HTTP {response.status_code}")
    return f"collection {collection} dropped from {server}"
