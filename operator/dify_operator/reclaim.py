"""Reclaim an index's vectors when it is deleted with `reclaimPolicy: Delete`.

The rule (where the vectors are, which names may be touched, the shard's lock) is
`dify_serving.catalog.reclaim`, shared with the local gateway's `DELETE /v1/indexes`;
here its refusals become kopf's: a name or URL that can never be reclaimed is a
`PermanentError`, a Qdrant that is down or a replica still holding the shard a
`TemporaryError` (the finalizer stays and kopf retries).
"""

from __future__ import annotations

from pathlib import Path

import kopf

from dify_serving.catalog.reclaim import ReclaimPending, ReclaimRefused, reclaim_vectors
from dify_serving.specs import DifyIndexSpec


def reclaim_index(
    name: str, spec: DifyIndexSpec, home: str | Path, qdrant_url: str | None = None
) -> str:
    """Drop the collection (Qdrant server) or the on-disk shard (embedded); say what went."""
    try:
        return reclaim_vectors(name, spec, home, qdrant_url)
    except ReclaimRefused as exc:
        raise kopf.PermanentError(exc.message) from None
    except ReclaimPending as exc:
        raise kopf.TemporaryError(exc.message, delay=5) from None
