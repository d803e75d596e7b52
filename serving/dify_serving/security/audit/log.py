"""`AuditLog`: the audit trail on SQLite (a file) or PostgreSQL (shared by many gateways).

It composes the package's parts and holds the policy between them: entries queue in the
writer (`writer.py`), each batch is cleaned (`entry.py`) and chained after the head
inside the chain lock (`chain.py`, `schema.py`); the writer thread copies the head to
the places outside the database (`checkpoint.py`) at least every `checkpoint_s` and once
more on close; `verify` walks the chain from the anchor and holds it against every
checkpoint (`verify.py`); `purge` removes a chain prefix past retention and records
itself in the same transaction; reads page by `seq` (`query.py`).

Entries carry request metadata only; `detail` is stored only when the caller fills it
(a setting decides). Retention is at least `MIN_RETENTION_DAYS` unless the caller says
otherwise explicitly.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Unpack

from dify_serving.security.audit.chain import (
    ChainKey,
    append_rows,
    chain_anchor,
    chain_head,
    hash_at,
    purge_entry,
    remove_prefix,
)
from dify_serving.security.audit.checkpoint import Checkpoint, CheckpointPlaces, read_all
from dify_serving.security.audit.entry import AuditEntry, storable
from dify_serving.security.audit.query import (
    EXPORT_PAGE_ROWS,
    AuditFilter,
    ExportFormat,
    Rows,
    export_lines,
    pages,
    query_page,
)
from dify_serving.security.audit.schema import ROW_ERRORS, AuditDatabase
from dify_serving.security.audit.seal import destroy_key, seal_rows
from dify_serving.security.audit.trail import AuditTrail
from dify_serving.security.audit.verify import VerifyReport, checkpoint_problem, judge, walk
from dify_serving.security.audit.writer import AuditWriter
from dify_serving.security.db import database_url
from dify_serving.security.secrets import audit_key, key_pepper

log = logging.getLogger(__name__)

MIN_RETENTION_DAYS = 180


class AuditLog(AuditTrail):
    """The trail in one database, written by its own thread (see the module docstring).

    `key` is the chain's HMAC key. With `checkpoints`, `verify` compares the chain with
    them, and the writer thread checkpoints the head every `checkpoint_s` (None: this
    log only reads them, as the gateway's reader beside its writer process does).
    """

    def __init__(
        self,
        url: str,
        *,
        key: bytes,
        checkpoints: CheckpointPlaces | None = None,
        checkpoint_s: float | None = 60.0,
        flush_interval_s: float = 1.0,
        max_batch: int = 500,
        retention_days: int = 180,
        allow_short_retention: bool = False,
        max_queue: int = 100_000,
    ) -> None:
        if checkpoint_s is not None and not checkpoint_s > 0:
            raise ValueError("checkpoint_s must be positive")
        self._writer = AuditWriter(  # checks its own settings; starts below
            self._write,
            prepare=self._ensure_schema,
            refused=ROW_ERRORS,
            flush_interval_s=flush_interval_s,
            max_batch=max_batch,
            max_queue=max_queue,
            checkpoint=self.checkpoint,
            checkpoint_s=checkpoint_s if checkpoints is not None else None,
        )
        self._retention_days = _checked_retention(retention_days, allow_short_retention)
        self._chain = ChainKey(key)
        self._db = AuditDatabase(url)
        self._places = checkpoints.open(self._chain.chain_id) if checkpoints else []
        self._failing_places: set[str] = set()
        self._writer.start()

    @classmethod
    def from_settings_like(
        cls,
        configured: str | None,
        home: Path,
        *,
        redis_url: str | None = None,
        configmap: str | None = None,
        **kw: Any,
    ) -> AuditLog:
        """The shared database when configured, else `home/audit.db`; the home's chain
        key and checkpoint places (`home_chain`)."""
        key, checkpoints = home_chain(home, redis_url=redis_url, configmap=configmap)
        return cls(database_url(home, configured, "audit"), key=key, checkpoints=checkpoints, **kw)

    @property
    def retention_days(self) -> int:
        return self._retention_days

    @property
    def dropped(self) -> int:
        """Entries lost: evicted from a full queue, unstorable, or recorded after close."""
        return self._writer.dropped

    @property
    def pending(self) -> int:
        """Entries recorded but not yet written (queued or being written)."""
        return self._writer.pending

    def record(self, entry: AuditEntry) -> None:
        """Queue one entry; never blocks on the database and never raises."""
        self._writer.record(entry)

    def flush(self) -> int:
        """Write what is queued now; returns rows written (entries stay queued on failure)."""
        return self._writer.flush()

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush and stop the writer, waiting at most `timeout_s` for it."""
        if not self._writer.close(timeout_s):
            return
        for place in self._places:
            place.close()
        self._db.dispose()

    def verify(self) -> VerifyReport:
        """Walk the chain from the anchor (or genesis), then hold it against every checkpoint.

        The checkpoints are read first: each names rows committed before it was written,
        so the snapshot taken after them sees those rows even while writers go on.
        """
        self._ensure_schema()
        points, unreadable = read_all(self._places)
        with self._db.snapshot() as conn:
            anchor = chain_anchor(conn)
            head = chain_head(conn)
            rows = pages(conn, [], 0, EXPORT_PAGE_ROWS)
            walked, hashes = walk(self._chain, rows, anchor, {p.seq for p in points})
        return judge(walked, head, anchor, hashes, points, unreadable, self._chain.chain_id)

    def purge(self, now: float | None = None) -> int:
        """Remove rows older than retention (a chain prefix), record it; returns rows removed."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        cutoff = now - self.retention_days * 86_400
        self._ensure_schema()
        with self._db.write_transaction() as conn:
            removed = remove_prefix(conn, cutoff)
            latency_ms = (time.perf_counter() - started) * 1000
            entry = purge_entry(now, removed, cutoff, chain_anchor(conn), latency_ms)
            append_rows(conn, [storable(entry)], self._chain)
        log.info("audit purge removed %d rows older than %.0f", removed, cutoff)
        return removed

    def shred(self, subject: str) -> int:
        """Destroy `subject`'s audit text key after writing every entry queued now, so the
        subject's text in rows recorded so far becomes unreadable (`seal.py`); the keys
        destroyed (0 or 1). Raises `AuditUnavailable` while the database is unreachable."""
        ref = self._chain.subject_ref(subject)
        return self._writer.after_queue(functools.partial(self._destroy_key, ref))

    def _destroy_key(self, ref: str) -> int:
        self._ensure_schema()
        with self._db.write_transaction() as conn:  # the chain lock: no batch is sealing
            return destroy_key(conn, ref)

    def checkpoint(self) -> None:
        """Copy the chain's head to every checkpoint place now (a place that fails is logged
        once until it works again). The writer thread does this every `checkpoint_s`."""
        now = time.time()
        for place in self._places:
            source = place.source
            try:
                place.update(functools.partial(self._next_head, now=now, source=source))
            except Exception as err:
                if source not in self._failing_places:
                    log.warning("audit checkpoint to %s failed: %s", source, err)
                self._failing_places.add(source)
                continue
            if source in self._failing_places:
                log.info("audit checkpoint to %s works again", source)
                self._failing_places.discard(source)

    def query(
        self, *, limit: int = 100, cursor: str | None = None, **where: Unpack[AuditFilter]
    ) -> Rows:
        """One page of rows in chain order, selected by `where` (see `AuditFilter`)."""
        return query_page(self._db, where, limit, cursor)

    def export(self, fmt: ExportFormat, **where: Unpack[AuditFilter]) -> Iterator[str]:
        """Stream matching rows as newline-terminated JSONL or CSV lines, page by page."""
        return export_lines(self._db, fmt, where)

    def _next_head(self, old: Checkpoint | None, now: float, source: str) -> Checkpoint | None:
        """The head now, to follow `old`; None (leave `old`) when the chain no longer holds it.

        Moving a checkpoint past a missing tail would hide it: the writer would have
        chained new rows onto the shortened chain, and `verify` would see nothing wrong.
        """
        self._ensure_schema()
        with self._db.snapshot() as conn:
            head, anchor = chain_head(conn), chain_anchor(conn)
            found = None if old is None else hash_at(conn, old.seq)
        if old is not None:
            problem = checkpoint_problem(old, found, anchor, head, self._chain.chain_id)
            if problem is not None:
                log.error(
                    "audit checkpoint in %s left at seq %d: %s (the chain's head is seq %d); "
                    "run `dify-mirror audit verify`",
                    source,
                    old.seq,
                    problem[0],
                    head.seq,
                )
                return None
        return Checkpoint(head.seq, head.hash, now, self._chain.chain_id)

    def _ensure_schema(self) -> None:
        self._db.ensure_schema()

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        self._ensure_schema()
        with self._db.write_transaction() as conn:
            append_rows(conn, seal_rows(conn, rows, self._chain), self._chain)


def home_chain(
    home: Path,
    *,
    pepper: bytes | None = None,
    redis_url: str | None = None,
    configmap: str | None = None,
) -> tuple[bytes, CheckpointPlaces]:
    """The chain's HMAC key (its own secret, else derived from the pepper) and the places
    its head is checkpointed (the home's file, Redis when given, the ConfigMap in a
    cluster): the same for the gateway's writer and the CLI that verifies."""
    key = audit_key(home, pepper if pepper is not None else key_pepper(home))
    return key, CheckpointPlaces.detect(home, redis_url, configmap)


def _checked_retention(days: int, allow_short: bool) -> int:
    if days < 1:
        raise ValueError("retention_days must be at least 1")
    if days < MIN_RETENTION_DAYS and not allow_short:
        raise ValueError(
            f"retention_days={days} is below the {MIN_RETENTION_DAYS}-day minimum; "
            "pass allow_short_retention=True to accept that"
        )
    return days
