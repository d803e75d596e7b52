"""Audit rows written by a child process, so the gateway's event loop only appends to a list.

Hashing the chain and inserting rows costs about 12 µs a row in Python; in the gateway's
own process that work competes with the event loop for the GIL, and on two cores it
took a quarter of a cheap route's throughput. Here `record()` appends the entry; every
50 ms (or 512 rows) the batch is pickled as the field names once and each entry's values
(a third of the cost of pickling the dataclasses) and written to a child process
(`python -m dify_serving.security.audit`, `serve` below), which rebuilds each entry by
field name and runs an ordinary `AuditLog` writer. Reads (query, export, verify, purge) go to the
database directly from here, through an `AuditLog` whose writer thread stays idle.

Crash loss: if the gateway dies, the child reads end-of-file, writes what it has and
exits, so only the last ≤ 50 ms still in the gateway's list are lost; if the child dies
it is restarted, and what it had not written (≤ one flush interval) is lost and counted.

The child also checkpoints the chain's head: it is the process that moves the head, it
already holds the database connection and the writer thread that wakes on a timer, and
the Redis and Kubernetes calls stay off the gateway's event loop. Its database URL, the
chain key and the Redis URL (secrets) reach it through stdin, never argv.

`shred` goes through the child too, as a message after the entries shipped before it:
the child writes those (sealing each with the subject's key) before destroying the key,
so no row recorded before an erasure is written readable after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Unpack

from dify_serving.security.audit.checkpoint import CheckpointPlaces
from dify_serving.security.audit.entry import FIELDS, AuditEntry, TextEntry, values_of
from dify_serving.security.audit.log import AuditLog, home_chain
from dify_serving.security.audit.query import AuditFilter, ExportFormat, Rows
from dify_serving.security.audit.trail import AuditTrail
from dify_serving.security.audit.verify import VerifyReport
from dify_serving.security.audit.writer import AuditUnavailable

log = logging.getLogger(__name__)

SHIP_EVERY_S = 0.05
SHIP_ROWS = 512


class AuditShipper(AuditTrail):
    """The trail for the gateway's event loop: writes go through a child process, reads
    to the database (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        key: bytes,
        checkpoints: CheckpointPlaces | None = None,
        checkpoint_s: float = 60.0,
        **options: Any,
    ) -> None:
        # reads, verify, purge and the schema; its writer thread stays idle
        self.reader = AuditLog(url, key=key, checkpoints=checkpoints, checkpoint_s=None, **options)
        writer = {
            "url": url,
            "key": key.hex(),
            "checkpoints": checkpoints.to_dict() if checkpoints else None,
            "checkpoint_s": checkpoint_s,
            "options": options,
        }
        self._args = json.dumps(writer).encode() + b"\n"
        self._buffer: list[AuditEntry] = []
        self._lock = threading.Lock()
        self._asking = threading.Lock()  # one question to the child (F, S) and its answer
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._lost = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawn()

    @classmethod
    def for_home(
        cls,
        url: str,
        home: Path,
        *,
        pepper: bytes | None = None,
        redis_url: str | None = None,
        configmap: str | None = None,
        **options: Any,
    ) -> AuditShipper:
        """The home's chain key and checkpoint places (`home_chain`)."""
        key, checkpoints = home_chain(home, pepper=pepper, redis_url=redis_url, configmap=configmap)
        return cls(url, key=key, checkpoints=checkpoints, **options)

    def _spawn(self) -> None:
        """Start the writer; its secrets go through stdin, never argv."""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dify_serving.security.audit"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(self._args)
        self._proc.stdin.flush()

    # ---- writes -------------------------------------------------------------------------
    def record(self, entry: AuditEntry) -> None:
        """Buffer the entry; shipped within `SHIP_EVERY_S`, or at once without a loop."""
        with self._lock:
            self._buffer.append(entry)
            full = len(self._buffer) >= SHIP_ROWS
        if full:
            self._ship()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a thread, the CLI): ship now
            self._ship()
            return
        if self._timer is None or self._timer_loop is not loop:  # none, or a finished loop's
            self._timer, self._timer_loop = loop.call_later(SHIP_EVERY_S, self._ship), loop

    def _ship(self, kind: bytes = b"E") -> None:
        with self._lock:
            entries, self._buffer = self._buffer, []
            self._timer = None
            batch = (FIELDS, [_shipped(entry) for entry in entries])
            payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL) if entries else b""
            if entries or kind != b"E":
                self._send(kind, payload, len(entries))

    def _send(self, kind: bytes, payload: bytes, rows: int) -> None:
        for attempt in (1, 2):
            proc = self._proc
            try:
                assert proc is not None and proc.stdin is not None
                proc.stdin.write(kind + len(payload).to_bytes(4, "big") + payload)
                proc.stdin.flush()
                return
            except (BrokenPipeError, OSError, AssertionError, ValueError):
                log.warning("audit writer process gone; restarting it (attempt %d)", attempt)
                self._spawn()
        self._lost += rows

    def flush(self) -> int:
        """Everything recorded so far is in the database when this returns."""
        with self._asking:
            self._ship(b"F")
            line = self._answer()
        return int(line or b"0")

    def shred(self, subject: str) -> int:
        """Destroy the subject's text key in the writer process, after every entry recorded
        here so far (so each is sealed with the key destroyed, `seal.py`)."""
        with self._asking:
            self._ship()
            with self._lock:
                self._send(b"S", subject.encode(), 0)
            line = self._answer().strip()
        if not line.isdigit():
            raise AuditUnavailable("the audit writer could not destroy the key; retry")
        return int(line)

    def _answer(self) -> bytes:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return b""
        return proc.stdout.readline()

    def close(self, timeout_s: float = 5.0) -> None:
        self._ship()
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.reader.close(timeout_s)

    @property
    def dropped(self) -> int:
        """Entries lost because the writer process could not be reached twice in a row."""
        return self._lost

    @property
    def pending(self) -> int:
        """Entries buffered here, not yet shipped (the child's queue is its own)."""
        return len(self._buffer)

    # ---- reads --------------------------------------------------------------------------
    @property
    def retention_days(self) -> int:
        return self.reader.retention_days

    def query(
        self, *, limit: int = 100, cursor: str | None = None, **where: Unpack[AuditFilter]
    ) -> Rows:
        return self.reader.query(limit=limit, cursor=cursor, **where)

    def export(self, fmt: ExportFormat, **where: Unpack[AuditFilter]) -> Iterator[str]:
        return self.reader.export(fmt, **where)

    def verify(self) -> VerifyReport:
        return self.reader.verify()

    def purge(self, now: float | None = None) -> int:
        """Purge from here: the purge row is chained under the same lock as the child's."""
        return self.reader.purge(now)


def _shipped(entry: AuditEntry) -> tuple[Any, ...]:
    """The entry's values; a `TextEntry`'s text and subjects after them."""
    if type(entry) is TextEntry:
        return (*values_of(entry), entry.text, entry.subjects)
    return values_of(entry)


def _rebuilt(names: tuple[str, ...], values: tuple[Any, ...]) -> AuditEntry:
    fields = dict(zip(names, values[: len(names)], strict=True))
    if len(values) > len(names):
        return TextEntry(**fields, text=values[-2], subjects=tuple(values[-1]))
    return AuditEntry(**fields)


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The writer process: its settings on the first line, then framed batches (`E`
    records, `F` records and answers with the rows written) until end-of-file, and `S`
    (a subject, UTF-8) shreds it, answering with the keys destroyed (`!` if it could
    not). A batch is `(field names, [values, ...])`: entries are rebuilt by name."""
    args = json.loads(stdin.readline())
    places = args["checkpoints"]
    audit = AuditLog(
        args["url"],
        key=bytes.fromhex(args["key"]),
        checkpoints=CheckpointPlaces.from_dict(places) if places else None,
        checkpoint_s=args["checkpoint_s"],
        **args["options"],
    )
    try:
        while True:
            head = stdin.read(5)
            if len(head) < 5:
                return
            payload = stdin.read(int.from_bytes(head[1:], "big"))
            if head[:1] == b"S":
                stdout.write(f"{_shred(audit, payload.decode())}\n".encode())
                stdout.flush()
                continue
            names, rows = pickle.loads(payload) if payload else ((), [])
            for values in rows:
                audit.record(_rebuilt(names, values))
            if head[:1] == b"F":
                stdout.write(f"{audit.flush()}\n".encode())
                stdout.flush()
    finally:
        audit.close()


def _shred(audit: AuditLog, subject: str) -> str:
    try:
        return str(audit.shred(subject))
    except Exception as err:  # the gateway's erasure answers 503 and is retried
        log.warning("audit text key not destroyed: %s", err)
        return "!"
