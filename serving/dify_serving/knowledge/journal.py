"""The intent of a vector write that takes several engine calls, on disk until it is whole.

One engine call (up to `UPSERT_BATCH` points) is applied whole or not at all: Qdrant logs
the operation before it applies it. An upsert of more points is several calls, and a
replica killed between two of them would leave a document with some chunks of the new
text and the rest of the old. So such a write (`BackendBase.upsert_many`) goes like a
database transaction:

1. the journal records, per document, the new version and how many points it has, and is
   flushed to disk (written aside, fsynced, renamed over);
2. the new points go in under ids of their own (`versioned_id`), beside the old ones,
   which stay whole;
3. the other versions of those documents are deleted, then the journal is removed.

The next replica to open the collection reads a journal left behind and finishes or
undoes each document (`BackendBase.open_journal`): all its new points there → the old
version goes (the write is finished); otherwise → the new points go (the old version
stays whole). Searches meanwhile may see a document's old and new points side by side,
never afterwards.

The journal holds document ids and versions, no text; it lives beside the shard's lock
(`layout.index_write_journal`).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("0f4e2b8a-6c1d-4f7e-9b3a-2d5c8e1f7a64")


def versioned_id(point_id: str, version: str) -> str:
    """The id a point takes in a multi-call write: its stable id and the write's version,
    so the new points never overwrite the old ones before the write is whole."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{point_id}\x1f{version}"))


@dataclass(frozen=True, slots=True)
class PendingDocument:
    version: str
    points: int


class WriteJournal:
    """The one multi-call write in progress of a collection (writes are serialized by the
    backend's write lock); `path` None keeps nothing (a backend opened without a home)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def begin(self, documents: dict[str, PendingDocument]) -> None:
        """Record the write before its first point goes in (durable when this returns)."""
        if self.path is None:
            return
        body = {doc: {"version": p.version, "points": p.points} for doc, p in documents.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_name(f"{self.path.name}.tmp")
        with open(aside, "w", encoding="utf-8") as handle:
            json.dump({"documents": body}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(aside, self.path)
        _sync_folder(self.path.parent)

    def end(self) -> None:
        """The write is whole: forget it."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def pending(self) -> dict[str, PendingDocument]:
        """The documents of a write a replica did not finish ({} when none, or when the
        journal is unreadable: a write never began with a torn journal, as it is renamed
        into place whole)."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            body = json.loads(self.path.read_text(encoding="utf-8"))
            return {
                str(doc): PendingDocument(str(p["version"]), int(p["points"]))
                for doc, p in body["documents"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("index write journal %s is unreadable; ignored", self.path.name)
            return {}


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
