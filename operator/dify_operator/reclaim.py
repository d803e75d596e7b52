"""Reclaim an index's vectors when it is deleted with `reclaimPolicy: Delete`.

The vectors are where the index replica opened them (`specs.store_address`, the rule
`open_backend` follows): a collection of a Qdrant server, its own `store.url` or the
deployment's `DIFY_MIRROR_QDRANT_URL`, else a shard folder (`layout.index_shard_dir`). The
collection name becomes a folder or a segment of a Qdrant URL, so it is checked again
here, whatever validated it before: a name that is not an RFC 1123 label, or a folder
that would not sit directly under `home/indexes`, is refused for good rather than removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import kopf

from dify_serving.layout import index_shard_dir, index_shards_root
from dify_serving.specs import DifyIndexSpec, is_name, qdrant_server, store_address


def reclaim_index(
    name: str, spec: DifyIndexSpec, home: str | Path, qdrant_url: str | None = None
) -> str:
    """Drop the collection (Qdrant server) or the on-disk shard (embedded); say what went."""
    collection = spec.store.collection or name
    if not is_name(collection):
        raise kopf.PermanentError(
            f"not reclaimed: collection {collection[:80]!r} is not a lower-case RFC 1123 name"
        )
    url = store_address(spec, qdrant_url)
    if url is not None or spec.store.type == "qdrant":
        return _drop_collection(url or "", collection)
    root = Path(os.path.abspath(index_shards_root(home)))
    shard = Path(os.path.abspath(index_shard_dir(home, collection)))
    if shard.parent != root:
        raise kopf.PermanentError(f"not reclaimed: {collection!r} is not a folder of {root}")
    if shard.is_symlink():  # the link goes, never what it points to
        shard.unlink()
    else:
        shutil.rmtree(shard, ignore_errors=True)
    return f"embedded collection {collection} removed from {root}"


def _drop_collection(url: str, collection: str) -> str:
    if urlsplit(url).scheme not in ("http", "https"):
        raise kopf.PermanentError("not reclaimed: the store URL is not an http(s) URL")
    server = qdrant_server(url)  # the port qdrant-client would use, 6333 when none is written
    try:
        response = httpx.delete(f"{server}/collections/{collection}", timeout=10)
    except httpx.HTTPError as exc:
        raise kopf.TemporaryError(f"Qdrant unreachable: {exc}", delay=5) from exc
    if response.status_code not in (200, 404):
        raise kopf.TemporaryError(
            f"Qdrant refused to drop {collection}: HTTP {response.status_code}", delay=5
        )
    return f"collection {collection} dropped from {server}"
