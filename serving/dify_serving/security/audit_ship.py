"""Audit rows written by a child process, so the gateway's event loop only appends to a list.

Hashing the chain and inserting rows costs about 12 µs a row in Python; in the gateway's
own process that work competes with the event loop for the GIL, and on two cores it
took a quarter of a cheap route's throughput. Here `record()` appends a tuple; every
50 ms (or 512 rows) the list is pickled and written to a child process
(`python -m dify_serving.security.audit_ship`), which runs an ordinary `AuditLog`
writer. Reads (query, export, verify, purge) go to the database directly from here.

Crash loss: if the gateway dies, the child reads end-of-file, writes what it has and
exits, so only the last ≤ 50 ms still in the gateway's list are lost; if the child dies
it is restarted, and what it had not written (≤ one flush interval) is lost and counted.

The child also checkpoints the chain's head: it is the process that moves the head, it
already holds the database connection and the writer thread that wakes on a timer, and
the Redis and Kubernetes calls stay off the gateway's event loop. Its database URL, the
chain key and the Redis URL (secrets) reach it through stdin, never argv.
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
from pathlib import Path
from typing import IO, Any

from dify_serving.security.audit import (
    FIELDS,
    AuditEntry,
    AuditLog,
    CheckpointPlaces,
    home_chain,
)

log = logging.getLogger("dify_serving.audit")

SHIP_EVERY_S = 0.05
SHIP_ROWS = 512


class AuditShipper:
    """`AuditLog`'s interface; writes go through a child process (see the module doc)."""

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
        self._buffer: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
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
        """The home's chain key and checkpoint places (`audit.home_chain`)."""
        key, checkpoints = home_chain(home, pepper=pepper, redis_url=redis_url, configmap=configmap)
        return cls(url, key=key, checkpoints=checkpoints, **options)

    def _spawn(self) -> None:
        """Start the writer; its secrets go through stdin, never argv."""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dify_serving.security.audit_ship"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(self._args)
        self._proc.stdin.flush()

    # ---- writes -------------------------------------------------------------------------
    def record(self, entry: AuditEntry) -> None:
        self.record_values(tuple(getattr(entry, name) for name in FIELDS))

    def record_values(self, row: tuple[Any, ...]) -> None:
        """`record` for the gateway's hot path: the values in `FIELDS` order."""
        with self._lock:
            self._buffer.append(row)
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
            rows, self._buffer = self._buffer, []
            self._timer = None
            payload = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL) if rows else b""
            if rows or kind != b"E":
                self._send(kind, payload, len(rows))

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
        self._ship(b"F")
        proc = self._proc
        if proc is None or proc.stdout is None:
            return 0
        line = proc.stdout.readline()
        return int(line or b"0")

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
        return self._lost

    @property
    def pending(self) -> int:
        return len(self._buffer)

    # ---- reads --------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # query, export, verify, purge, retention_days
        if name == "reader":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.reader, name)


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
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
            for row in pickle.loads(payload) if payload else []:
                audit.record(AuditEntry(*row))
            if head[:1] == b"F":
                stdout.write(f"{audit.flush()}\n".encode())
                stdout.flush()
    finally:
        audit.close()


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
