"""Vector backends: one interface (`VectorBackend`), two implementations, one factory.

`open_backend` imports the module of the backend it returns and no other (each loads its
Qdrant binding on first use), so a replica on a Qdrant server never loads the Edge
binding. The backends import `base`, never this package, so nothing imports back and
there is no circle to hide behind lazy re-exports; a caller that needs a backend's own
class imports it from that backend's module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dify_serving.knowledge.backends.base import VectorBackend
from dify_serving.layout import index_shard_dir, index_write_journal
from dify_serving.specs import DifyIndexSpec, is_name, store_address

__all__ = ["VectorBackend", "open_backend"]


def open_backend(
    index_name: str,
    spec: DifyIndexSpec,
    home: str | Path,
    qdrant_url: str | None = None,
    *,
    client: Any = None,
) -> VectorBackend:
    """The backend an index's spec asks for.

    `store.type: qdrant` uses `store.url`; an embedded index uses the `qdrant_url` setting
    when one is given, else a Qdrant Edge shard in `layout.index_shard_dir` (the rule of
    `specs.store_address`, which the collection clash check and reclaim follow too).
    `client` injects a ready `QdrantClient` (tests: local mode). The backend keeps its
    multi-call writes' journal under `home` (`layout.index_write_journal`), and repairs a
    write a killed replica left half done before it returns.

    Raises:
        ValueError: the collection is not a lower-case RFC 1123 name (it becomes a folder
            name or a URL path segment; the specs refuse it earlier, this is the last line).
    """
    collection = spec.store.collection or index_name
    if not is_name(collection):
        raise ValueError(f"collection {collection[:80]!r} is not a lower-case RFC 1123 name")
    url = store_address(spec, qdrant_url)
    if client is None and url:
        from qdrant_client import QdrantClient

        client = QdrantClient(url=url, timeout=30)
    backend: VectorBackend
    if client is not None:
        from dify_serving.knowledge.backends.qdrant_server import QdrantServerBackend

        backend = QdrantServerBackend(client, collection, spec)
    else:
        from dify_serving.knowledge.backends.qdrant_edge import QdrantEdgeBackend

        backend = QdrantEdgeBackend(index_shard_dir(home, collection), collection, spec)
    backend.open_journal(index_write_journal(home, collection))
    return backend
