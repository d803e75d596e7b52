"""Reclaim an index's vectors when it is deleted with `reclaimPolicy: Delete`.

The collection name becomes a folder under `home/indexes` or a segment of a Qdrant URL,
so it is checked again here, whatever validated it before: a name that is not an RFC
1123 label, or a folder that would not sit directly under `home/indexes`, is refused
for good rather than removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import kopf

from dify_serving.specs import DifyIndexSpec, is_name


def reclaim_index(name: str, spec: DifyIndexSpec, home: str) -> str:
    """Drop the collection (Qdrant server) or the on-disk shard (embedded); say what went."""
    collection = spec.store.collection or name
    if not is_name(collection):
        raise kopf.PermanentError(
            f"not reclaimed: collection {collection[:80]!r} is not a lower-case RFC 1123 name"
        )
    if spec.store.type == "qdrant":
        return _drop_collection(spec.store.url or "", collection)
    root = Path(os.path.abspath(Path(home) / "indexes"))
    shard = Path(os.path.normpath(root / collection))
    if shard.parent != root:
        raise kopf.PermanentError(f"not reclaimed: {collection!r} is not a folder of {root}")
    if shard.is_symlink():  # the link goes, never what it points to
        shard.unlink()
    else:
        shutil.rmtree(shard, ignore_errors=True)
    return f"embedded collection {collection} removed from {root}"


def _drop_collection(url: str, collection: str) -> str:
    if urlsplit(url).scheme not in ("http", "https"):
        raise kopf.PermanentError("not reclaimed: store.url is not an http(s) URL")
    try:
        response = httpx.delete(f"{url.rstrip('/')}/collections/{collection}", timeout=10)
    except httpx.HTTPError as exc:
        raise kopf.TemporaryError(f"Qdrant unreachable: {exc}", delay=5) from exc
    if response.status_code not in (200, 404):
        raise kopf.TemporaryError(
            f"Qdrant refused to drop {collection}: HTTP {response.status_code}", delay=5
        )
    return f"collection {collection} dropped from {url}"
