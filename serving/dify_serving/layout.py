"""Where an embedded index's vectors live under `DIFY_MIRROR_HOME`: one rule, one module.

The index replica opens its Qdrant Edge shard here, the gateway asks whether one was
ever created, and the operator removes it on `reclaimPolicy: Delete`. The operator must
stay light (no Qdrant binding, torch or Ray), so the rule lives in this stdlib-only
module rather than beside the backend that uses it.

A collection name becomes a folder name. The specs already allow only RFC 1123 labels;
`index_shard_dir` still refuses anything that is not one plain folder name, so a bug
upstream cannot point a write or a delete outside `home/indexes`.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder under the home that holds one folder per embedded collection.
INDEX_SHARDS = "indexes"


def index_shards_root(home: str | os.PathLike[str]) -> Path:
    """The folder holding every embedded collection's shard folder (and their locks)."""
    return Path(home) / INDEX_SHARDS


def index_shard_dir(home: str | os.PathLike[str], collection: str) -> Path:
    """The folder of one embedded collection: `home/indexes/<collection>`.

    Raises:
        ValueError: `collection` is not one plain folder name (empty, `.`, `..`, a path).
    """
    if collection in ("", ".", "..") or os.sep in collection or "/" in collection:
        raise ValueError(f"collection {collection[:80]!r} is not a folder name")
    return index_shards_root(home) / collection


def index_shard_lock(home: str | os.PathLike[str], collection: str) -> Path:
    """The lock file one replica holds while it owns the collection's shard folder.

    Beside the folder, not in it: it is taken before the folder exists, and it outlives a
    `drop()` that removes the folder.
    """
    return index_shards_root(home) / f".{index_shard_dir(home, collection).name}.lock"


def index_write_journal(home: str | os.PathLike[str], collection: str) -> Path:
    """The journal of the collection's multi-call write in progress
    (`knowledge.backends.base.WriteJournal`), beside the shard folder like its lock: it
    must outlive a replica killed in the middle of that write, for the next one to repair.
    """
    return index_shards_root(home) / f".{index_shard_dir(home, collection).name}.journal"
