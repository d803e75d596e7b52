"""The audit trail: one row per gateway request, tamper-evident, written off the request path.

Why it is built this way:

* **Cheap on the request path.** `record()` only appends to an in-memory deque under a lock:
  well under a microsecond on average and never a database call (like any Python call it can
  still wait for the GIL while the writer hashes a batch). A writer thread turns the queue into
  rows every `flush_interval_s` (1 s by default) or as soon as `max_batch` (500) entries wait,
  one transaction per batch. **A crash loses at most the last flush interval: by default up to
  1 second of requests** (while the database is unreachable: everything still queued, at most
  `max_queue` entries). A full queue drops its oldest entries and counts them in `dropped`; a
  failed write puts its batch back at the head of the queue and is retried with backoff.
  Nothing raises into the caller.
* **One keyed hash chain, even with many writers** (`audit_chain.py`). Each row has a `seq`
  and an HMAC over its fields, `seq` and `prev_hash`, keyed with the audit key, which is not
  in the database; the first row links to `GENESIS`. Reading the chain head and inserting the
  batch happen in one transaction under a database-wide lock (`pg_advisory_xact_lock` on
  PostgreSQL, `BEGIN IMMEDIATE` on SQLite in WAL mode), so gateway processes sharing a
  database extend a single chain. `seq` is assigned here, not by an autoincrement, so a
  deleted row leaves a gap that `verify()` reports as "chain broken", and an edited row no
  longer matches its hash ("hash mismatch").
* **Checkpoints cover the tail.** The writer thread copies the head (seq, hash, time) to the
  places outside the database (`audit_checkpoint.py`) at least every `checkpoint_s`, and once
  more on close; `verify()` fails when a checkpoint names rows the chain no longer has.
* **Retention without breaking the chain.** `purge()` deletes a *prefix* of the chain: the rows
  before the first one still inside retention. A row's `time` is the request's, not its flush
  time, so rows are only roughly time-ordered; deleting by time alone could punch a hole in
  the middle, while a prefix never does and never removes anything newer than the cutoff. The
  purge stores the last removed row's `(seq, hash)` as the anchor in `audit_anchor` and
  appends an "audit.purge" row whose `detail` repeats that anchor, in the same transaction.
  `verify()` starts from the anchor instead of `GENESIS` and trusts it only when a chained
  purge row vouches for it, so rewriting `audit_anchor` to hide deleted rows is caught too.
  A checkpoint was chosen over re-hashing the survivors: a purge stays one DELETE and hashes
  already exported stay valid.
* **No secrets, no content.** Entries carry request metadata only; `detail` is stored only
  when the caller fills it (a setting decides); `audit_entry.py` cleans the values.
* **Bounded reads.** Queries are keyset-paged by `seq` with an opaque cursor and a limit
  clamped to 1..1000, and exports page internally, so any time range costs bounded memory.
  Every filter value is a bound parameter. CSV cells a spreadsheet would evaluate as formulas
  are prefixed with `'`; JSONL is the lossless format.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import hashlib
import io
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    exc,
    func,
    insert,
    select,
    text,
)

from dify_serving.security.audit_chain import (
    ANCHOR_UNVOUCHED,
    CHAIN_BROKEN,
    CHECKPOINT_MISMATCH,
    CHECKPOINT_UNREADABLE,
    GENESIS,
    HASH_MISMATCH,
    OTHER_CHAIN,
    PURGE_ROUTE,
    TAIL_MISSING,
    ChainKey,
    Checkpoint,
    Head,
    VerifyReport,
    checkpoint_problem,
    judge,
    walk,
)
from dify_serving.security.audit_checkpoint import CheckpointPlaces, read_all
from dify_serving.security.audit_entry import COLUMNS, FIELDS, MAX_SHORT_TEXT, AuditEntry, storable
from dify_serving.security.db import create_engine, database_url
from dify_serving.security.secrets import audit_key, key_pepper

__all__ = [
    "ANCHOR_UNVOUCHED",
    "CHAIN_BROKEN",
    "CHECKPOINT_MISMATCH",
    "CHECKPOINT_UNREADABLE",
    "COLUMNS",
    "FIELDS",
    "GENESIS",
    "HASH_MISMATCH",
    "MAX_SHORT_TEXT",
    "OTHER_CHAIN",
    "PURGE_ROUTE",
    "TAIL_MISSING",
    "AuditEntry",
    "AuditFilter",
    "AuditLog",
    "Checkpoint",
    "CheckpointPlaces",
    "Head",
    "VerifyReport",
    "home_chain",
]

log = logging.getLogger(__name__)

MIN_RETENTION_DAYS = 180
MAX_QUERY_LIMIT = 1000
EXPORT_PAGE_ROWS = 1000
MAX_BACKOFF_S = 30.0
_WRITE_OPTION = "audit_write"
_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"dify_mirror.audit_log").digest()[:8], "big", signed=True
)
_CURSOR = re.compile(r"seq:(\d{1,18})")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_ROW_ERRORS = (exc.DataError, exc.IntegrityError)


class AuditFilter(TypedDict, total=False):
    """What `query` and `export` select by (`since` inclusive, `until` exclusive)."""

    since: float | None
    until: float | None
    key_id: str | None
    route: str | None
    status: int | None
    client_ip: str | None


_FILTER_NAMES = frozenset(AuditFilter.__annotations__)

_METADATA = MetaData()
_LOG = Table(
    "audit_log",
    _METADATA,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", Double, nullable=False),
    Column("request_id", String, nullable=False),
    Column("key_id", String),
    Column("client_ip", String),
    Column("method", String, nullable=False),
    Column("route", String, nullable=False),
    Column("status", Integer, nullable=False),
    Column("latency_ms", Double, nullable=False),
    Column("model", String),
    Column("index", String),
    Column("prompt_tokens", BigInteger),
    Column("completion_tokens", BigInteger),
    Column("bytes_in", BigInteger),
    Column("bytes_out", BigInteger),
    Column("detail", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
Index("ix_audit_log_time", _LOG.c.time)
Index("ix_audit_log_key_id_time", _LOG.c.key_id, _LOG.c.time)
Index("ix_audit_log_route_time", _LOG.c.route, _LOG.c.time)
# No index on status or client_ip: each one costs every insert a B-tree write, and those
# filters are answered by scanning in `seq` order within the page bound (and usually a
# time range), which stays cheap.
_ANCHOR = Table(
    "audit_anchor",
    _METADATA,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)


class AuditLog:
    """The audit trail on SQLite (a file) or PostgreSQL (shared by many gateway processes).

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
        _check_settings(flush_interval_s, max_batch, max_queue)
        if checkpoint_s is not None and not checkpoint_s > 0:
            raise ValueError("checkpoint_s must be positive")
        self.retention_days = _checked_retention(retention_days, allow_short_retention)
        self._chain = ChainKey(key)
        self._engine = _engine_for(url)
        self._write_engine = self._engine.execution_options(**{_WRITE_OPTION: True})
        self._places = checkpoints.open(self._chain.chain_id) if checkpoints else []
        self._checkpoint_s = checkpoint_s if self._places else None
        self._next_checkpoint = 0.0  # time.monotonic() when the head is due again
        self._failing_places: set[str] = set()
        self._interval = flush_interval_s
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._queue: deque[AuditEntry] = deque(maxlen=max_queue)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._in_flight = 0
        self._dropped = 0
        self._closed = False
        self._schema_ready = False
        self._outage = False
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
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
    def dropped(self) -> int:
        """Entries lost: evicted from a full queue, unstorable, or recorded after close."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Entries recorded but not yet written (queued or being written)."""
        return len(self._queue) + self._in_flight

    def record(self, entry: AuditEntry) -> None:
        """Queue one entry; never blocks on the database and never raises."""
        with self._lock:
            if self._closed or len(self._queue) == self._max_queue:
                self._dropped += 1
                if self._closed:
                    return
            self._queue.append(entry)
            waiting = len(self._queue)
        if waiting >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    def flush(self) -> int:
        """Write what is queued now; returns rows written (entries stay queued on failure)."""
        return self._drain()[0]

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush and stop the writer, waiting at most `timeout_s` for it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._writer.join(timeout_s)
        if self._writer.is_alive():
            log.warning(
                "audit writer busy after %.1fs; %d entries may be lost", timeout_s, self.pending
            )
            return
        if self.pending:
            log.warning("audit log closed with %d entries unwritten", self.pending)
        for place in self._places:
            place.close()
        self._engine.dispose()

    def verify(self) -> VerifyReport:
        """Walk the chain from the anchor (or genesis), then hold it against every checkpoint.

        The checkpoints are read first: each names rows committed before it was written,
        so the snapshot taken after them sees those rows even while writers go on.
        """
        self._ensure_schema()
        points, unreadable = read_all(self._places)
        with self._snapshot() as conn:
            anchor = _anchor(conn)
            head = _chain_head(conn)
            rows = _pages(conn, [], 0, EXPORT_PAGE_ROWS)
            walked, hashes = walk(self._chain, rows, anchor, {p.seq for p in points})
        return judge(walked, head, anchor, hashes, points, unreadable, self._chain.chain_id)

    def purge(self, now: float | None = None) -> int:
        """Remove rows older than retention (a chain prefix), record it; returns rows removed."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        cutoff = now - self.retention_days * 86_400
        self._ensure_schema()
        with self._write_transaction() as conn:
            removed = _remove_prefix(conn, cutoff)
            latency_ms = (time.perf_counter() - started) * 1000
            entry = _purge_entry(now, removed, cutoff, _anchor(conn), latency_ms)
            _append(conn, [storable(entry)], self._chain)
        log.info("audit purge removed %d rows older than %.0f", removed, cutoff)
        return removed

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

    def _next_head(self, old: Checkpoint | None, now: float, source: str) -> Checkpoint | None:
        """The head now, to follow `old`; None (leave `old`) when the chain no longer holds it.

        Moving a checkpoint past a missing tail would hide it: the writer would have
        chained new rows onto the shortened chain, and `verify` would see nothing wrong.
        """
        self._ensure_schema()
        with self._snapshot() as conn:
            head, anchor = _chain_head(conn), _anchor(conn)
            found = None if old is None else _hash_at(conn, old.seq)
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

    def query(
        self, *, limit: int = 100, cursor: str | None = None, **where: Unpack[AuditFilter]
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of rows in chain order, selected by `where` (see `AuditFilter`)."""
        conditions = _filters(where)
        after = 0 if cursor is None else decode_cursor(cursor)
        size = max(1, min(int(limit), MAX_QUERY_LIMIT))
        self._ensure_schema()
        with self._engine.connect() as conn:
            rows = _page(conn, conditions, after, size + 1)
        if len(rows) <= size:
            return rows, None
        return rows[:size], encode_cursor(rows[size - 1]["seq"])

    def export(self, fmt: Literal["jsonl", "csv"], **where: Unpack[AuditFilter]) -> Iterator[str]:
        """Stream matching rows as newline-terminated JSONL or CSV lines, page by page."""
        if fmt not in ("jsonl", "csv"):
            raise ValueError(f"export format must be 'jsonl' or 'csv', not {fmt!r}")
        rows = self._scan(_filters(where))
        return _jsonl_lines(rows) if fmt == "jsonl" else _csv_lines(rows)

    def _scan(self, conditions: list[ColumnElement[bool]]) -> Iterator[dict[str, Any]]:
        self._ensure_schema()
        after = 0
        while True:
            with self._engine.connect() as conn:
                rows = _page(conn, conditions, after, EXPORT_PAGE_ROWS)
            yield from rows
            if len(rows) < EXPORT_PAGE_ROWS:
                return
            after = rows[-1]["seq"]

    def _run(self) -> None:
        self._try_schema()
        delay = self._interval
        while not self._stop.is_set():
            if delay > self._interval:
                self._stop.wait(delay)
            else:
                self._wake.wait(min(delay, self._until_checkpoint()))
            self._wake.clear()
            if self._stop.is_set():
                break
            ok = self._drain()[1]
            delay = self._interval if ok else min(max(delay, self._interval) * 2, MAX_BACKOFF_S)
            if ok and self._until_checkpoint() <= 0:
                self._next_checkpoint = time.monotonic() + (self._checkpoint_s or 0.0)
                self.checkpoint()
        if self._drain()[1] and self._checkpoint_s is not None:
            self.checkpoint()

    def _until_checkpoint(self) -> float:
        if self._checkpoint_s is None:
            return float("inf")
        return max(0.0, self._next_checkpoint - time.monotonic())

    def _try_schema(self) -> None:
        try:
            self._ensure_schema()
        except Exception as err:
            self._note_outage(err)

    def _drain(self) -> tuple[int, bool]:
        with self._flush_lock:
            written = 0
            for _ in range(-(-self.pending // self._max_batch)):
                try:
                    written += self._write_batch()
                except Exception as err:
                    self._note_outage(err)
                    return written, False
                self._note_recovery()
            return written, True

    def _write_batch(self) -> int:
        batch = self._take(self._max_batch)
        kept, rows = self._convert(batch)
        try:
            if rows:
                self._ensure_schema()
                with self._write_transaction() as conn:
                    _append(conn, rows, self._chain)
        except _ROW_ERRORS:
            log.exception("audit batch of %d rows refused by the database; dropped", len(rows))
            self._forget(len(rows))
            return 0
        except Exception:
            self._requeue(kept)
            raise
        self._forget(0)
        return len(rows)

    def _take(self, n: int) -> list[AuditEntry]:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
            self._in_flight = len(batch)
        return batch

    def _requeue(self, entries: list[AuditEntry]) -> None:
        with self._lock:
            room = self._max_queue - len(self._queue)
            keep = entries[max(0, len(entries) - room) :]
            self._dropped += len(entries) - len(keep)
            self._queue.extendleft(reversed(keep))
            self._in_flight = 0

    def _forget(self, lost: int) -> None:
        with self._lock:
            self._dropped += lost
            self._in_flight = 0

    def _convert(self, batch: list[AuditEntry]) -> tuple[list[AuditEntry], list[tuple[Any, ...]]]:
        kept: list[AuditEntry] = []
        rows: list[tuple[Any, ...]] = []
        for entry in batch:
            try:
                rows.append(storable(entry))
            except (TypeError, ValueError, OverflowError) as err:
                log.warning("audit entry %r not storable (%s); dropped", entry.request_id, err)
                continue
            kept.append(entry)
        with self._lock:
            self._dropped += len(batch) - len(kept)
            self._in_flight = len(kept)
        return kept, rows

    def _note_outage(self, err: Exception) -> None:
        if not self._outage:
            log.warning("audit database unavailable, %d entries queued: %s", self.pending, err)
        self._outage = True

    def _note_recovery(self) -> None:
        if self._outage:
            log.info("audit database reachable again")
        self._outage = False

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._write_transaction() as conn:
            _METADATA.create_all(conn)
        self._schema_ready = True

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        """A transaction that holds the chain lock: no other writer can read or move the head."""
        with self._write_engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            yield conn

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read transaction with one consistent view across pages."""
        with self._engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn


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


def encode_cursor(seq: int) -> str:
    """The opaque cursor that resumes a query after row `seq`."""
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The `seq` inside a cursor from `encode_cursor`; ValueError for anything else."""
    problem = f"malformed audit cursor {cursor[:40]!r}: pass back a next_cursor from query()"
    if not isinstance(cursor, str) or not 0 < len(cursor) <= 40:
        raise ValueError(problem)
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        match = _CURSOR.fullmatch(raw.decode("ascii"))
    except (binascii.Error, UnicodeDecodeError):
        match = None
    if match is None:
        raise ValueError(problem)
    return int(match.group(1))


def _check_settings(flush_interval_s: float, max_batch: int, max_queue: int) -> None:
    if not flush_interval_s > 0:
        raise ValueError("flush_interval_s must be positive")
    if max_batch < 1 or max_queue < 1:
        raise ValueError("max_batch and max_queue must be at least 1")


def _checked_retention(days: int, allow_short: bool) -> int:
    if days < 1:
        raise ValueError("retention_days must be at least 1")
    if days < MIN_RETENTION_DAYS and not allow_short:
        raise ValueError(
            f"retention_days={days} is below the {MIN_RETENTION_DAYS}-day minimum; "
            "pass allow_short_retention=True to accept that"
        )
    return days


def _engine_for(url: str) -> Engine:
    engine = create_engine(url, file_only=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we say BEGIN (IMMEDIATE) ourselves


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE_OPTION)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _append(conn: Connection, rows: list[tuple[Any, ...]], chain: ChainKey) -> None:
    """Chain `rows` (values in `FIELDS` order) after the head and insert them.

    The caller holds the chain lock.
    """
    head = _chain_head(conn)
    seq, prev_hash = head.seq, head.hash
    chained = []
    for values in rows:
        seq += 1
        digest = chain.digest_values(seq, values, prev_hash)
        chained.append((seq, *values, prev_hash, digest))
        prev_hash = digest
    marks = ", ".join(["?" if conn.dialect.paramstyle == "qmark" else "%s"] * len(COLUMNS))
    names = ", ".join(f'"{c}"' for c in COLUMNS)
    conn.exec_driver_sql(  # the driver's executemany: no per-row SQL compilation
        f"INSERT INTO audit_log ({names}) VALUES ({marks})", chained
    )


def _chain_head(conn: Connection) -> Head:
    last = conn.execute(select(_LOG.c.seq, _LOG.c.hash).order_by(_LOG.c.seq.desc()).limit(1))
    row = last.first()
    return Head(int(row.seq), str(row.hash)) if row else (_anchor(conn) or Head(0, GENESIS))


def _anchor(conn: Connection) -> Head | None:
    row = conn.execute(select(_ANCHOR.c.seq, _ANCHOR.c.hash)).first()
    return Head(int(row.seq), str(row.hash)) if row else None


def _hash_at(conn: Connection, seq: int) -> str | None:
    found = conn.scalar(select(_LOG.c.hash).where(_LOG.c.seq == seq))
    return None if found is None else str(found)


def _remove_prefix(conn: Connection, cutoff: float) -> int:
    """Delete rows before the first row at or after `cutoff`; anchor the chain at the last one."""
    first_kept = conn.scalar(select(func.min(_LOG.c.seq)).where(_LOG.c.time >= cutoff))
    candidates = select(_LOG.c.seq, _LOG.c.hash).order_by(_LOG.c.seq.desc()).limit(1)
    if first_kept is not None:
        candidates = candidates.where(_LOG.c.seq < first_kept)
    last_removed = conn.execute(candidates).first()
    if last_removed is None:
        return 0
    removed = conn.execute(delete(_LOG).where(_LOG.c.seq <= last_removed.seq)).rowcount
    conn.execute(delete(_ANCHOR))
    conn.execute(insert(_ANCHOR), {"id": 1, "seq": last_removed.seq, "hash": last_removed.hash})
    return int(removed)


def _purge_entry(
    now: float, removed: int, cutoff: float, anchor: Head | None, latency_ms: float
) -> AuditEntry:
    detail = {
        "removed": removed,
        "cutoff": cutoff,
        "anchor_seq": anchor.seq if anchor else None,
        "anchor_hash": anchor.hash if anchor else None,
    }
    return AuditEntry(
        time=now,
        request_id=f"purge-{uuid.uuid4().hex}",
        key_id=None,
        client_ip=None,
        method="PURGE",
        route=PURGE_ROUTE,
        status=200,
        latency_ms=latency_ms,
        detail=json.dumps(detail, sort_keys=True),
    )


def _filters(where: AuditFilter) -> list[ColumnElement[bool]]:
    unknown = sorted(set(where) - _FILTER_NAMES)
    if unknown:
        raise TypeError(f"unknown audit filter(s): {', '.join(unknown)}")
    conditions: list[ColumnElement[bool]] = []
    if (since := where.get("since")) is not None:
        conditions.append(_LOG.c.time >= float(since))
    if (until := where.get("until")) is not None:
        conditions.append(_LOG.c.time < float(until))
    if (status := where.get("status")) is not None:
        conditions.append(_LOG.c.status == int(status))
    for name in ("key_id", "route", "client_ip"):
        if (value := where.get(name)) is not None:
            conditions.append(_LOG.c[name] == value)
    return conditions


def _page(
    conn: Connection, conditions: list[ColumnElement[bool]], after: int, size: int
) -> list[dict[str, Any]]:
    statement = select(_LOG).where(*conditions, _LOG.c.seq > after)
    result = conn.execute(statement.order_by(_LOG.c.seq).limit(size))
    return [dict(row) for row in result.mappings()]


def _pages(
    conn: Connection, conditions: list[ColumnElement[bool]], after: int, size: int
) -> Iterator[dict[str, Any]]:
    while True:
        rows = _page(conn, conditions, after, size)
        yield from rows
        if len(rows) < size:
            return
        after = rows[-1]["seq"]


def _jsonl_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def _csv_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    yield _csv_line(COLUMNS)
    for row in rows:
        yield _csv_line([_spreadsheet_safe(row[name]) for name in COLUMNS])


def _csv_line(values: Iterable[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _spreadsheet_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
