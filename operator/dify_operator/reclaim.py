"""Reclaim an index's vectors when it is deleted with `reclaimPolicy: Delete`."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import kopf

from dify_serving.specs import DifyIndexSpec


def reclaim_index(name: str, spec: DifyIndexSpec, home: str) -> str:
    """Drop the collection (Qdrant server) or the on-disk shard (embedded); say what went."""
    collection = spec.store.collection or name
    if spec.store.type == "qdrant":
        url = f"{(spec.store.url or '').rstrip('/')}/collections/{collection}"
        try:
            response = httpx.delete(url, timeout=10)
        except httpx.HTTPError as exc:
            raise kopf.TemporaryError(f"Qdrant unreachable: {exc}", delay=5) from exc
        if response.status_code not in (200, 404):
            raise kopf.TemporaryError(
                f"Qdrant refused to drop {collection}: HTTP {response.status_code}", delay=5
            )
        return f"collection {collection} dropped from {spec.store.url}"
    shard = Path(home) / "indexes" / collection
    shutil.rmtree(shard, ignore_errors=True)
    return f"embedded collection {collection} removed from {shard.parent}"
