"""The audit writer: a queue that `record()` appends to, and a thread that drains it.

Cheap on the request path: `record()` only appends to an in-memory deque under a lock:
well under a microsecond on average and never a database call (like any Python call it
can still wait for the GIL while the writer hashes a batch). The thread turns the queue
into rows every `flush_interval_s` (1 s by default) or as soon as `max_batch` (500)
entries wait, one transaction per batch. **A crash loses at most the last flush
interval: by default up to 1 second of requests** (while the database is unreachable:
everything still queued, at most `max_queue` entries).

Nothing raises into the caller. A full queue drops its oldest entries and counts them in
`dropped`; an entry that cannot be stored (`entry.storable` refuses it) is dropped and
counted; a batch the database refuses for its content is dropped and counted; any other
failure (an outage) puts the batch back at the head of the queue, logs the outage once,
and retries with backoff up to `MAX_BACKOFF_S`.

The writer knows nothing of SQL or the chain: `write` stores one batch of cleaned rows,
and `checkpoint` runs on the same thread every `checkpoint_s` after a successful write
(and once more when the writer stops), so the head is copied out by the process that
moves it. `after_queue` runs an action ordered after every entry recorded before it
(erasure destroys a subject's text key there: no row queued before it is written after).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from dify_serving.security.audit.entry import AuditEntry, storable

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0

#: Stores one batch of rows (values in `FIELDS` order) in one transaction.
WriteBatch = Callable[[list[tuple[Any, ...]]], None]
T = TypeVar("T")


class AuditUnavailable(RuntimeError):
    """The audit database (or the writer process) cannot be reached now; retry later."""


class AuditWriter:
    """Queue + background thread (see the module docstring); `start()` begins writing.

    `prepare` runs first on the thread (an outage there is retried by the first write);
    `refused` are the errors for which a batch is dropped instead of retried;
    `checkpoint_s` None means the thread never calls `checkpoint`.
    """

    def __init__(
        self,
        write: WriteBatch,
        *,
        prepare: Callable[[], None],
        refused: tuple[type[Exception], ...],
        flush_interval_s: float,
        max_batch: int,
        max_queue: int,
        checkpoint: Callable[[], None],
        checkpoint_s: float | None,
    ) -> None:
        if not flush_interval_s > 0:
            raise ValueError("flush_interval_s must be positive")
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._write = write
        self._prepare = prepare
        self._refused = refused
        self._interval = flush_interval_s
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._checkpoint = checkpoint
        self._checkpoint_s = checkpoint_s
        self._next_checkpoint = 0.0  # time.monotonic() when the head is due again
        self._queue: deque[AuditEntry] = deque(maxlen=max_queue)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._in_flight = 0
        self._dropped = 0
        self._closed = False
        self._outage = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

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

    def after_queue(self, action: Callable[[], T]) -> T:
        """Write what is queued now, then run `action` before any later batch is written.

        Raises `AuditUnavailable` (and `action` does not run) when the queue cannot be
        written, so nothing queued before it can be written after it.
        """
        with self._flush_lock:
            if not self._drain_locked()[1]:
                raise AuditUnavailable(f"audit database unavailable; {self.pending} entries queued")
            return action()

    def close(self, timeout_s: float) -> bool:
        """Flush and stop the thread, waiting at most `timeout_s` for it. True when it
        stopped now, so what it used may be released; False when it was already closed
        or is still busy."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning(
                "audit writer busy after %.1fs; %d entries may be lost", timeout_s, self.pending
            )
            return False
        if self.pending:
            log.warning("audit log closed with %d entries unwritten", self.pending)
        return True

    def _run(self) -> None:
        try:
            self._prepare()
        except Exception as err:
            self._note_outage(err)
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
                self._checkpoint()
        if self._drain()[1] and self._checkpoint_s is not None:
            self._checkpoint()

    def _until_checkpoint(self) -> float:
        if self._checkpoint_s is None:
            return float("inf")
        return max(0.0, self._next_checkpoint - time.monotonic())

    def _drain(self) -> tuple[int, bool]:
        with self._flush_lock:
            return self._drain_locked()

    def _drain_locked(self) -> tuple[int, bool]:
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
                self._write(rows)
        except self._refused:
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
