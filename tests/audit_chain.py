"""Audit rows and a short audit chain in SQLite, tampered with behind the log's back, and
its checkpoint file read back: what the audit tests of every group share.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from dify_serving.security.audit import AuditEntry, AuditLog, Checkpoint

KEY = b"checkpoint-test-audit-key-012345"
#: The key and clock of the audit log tests (`test_audit.py` in unit/ and services/).
LOG_KEY = b"test-audit-key-0123456789abcdef"
NOW = time.time()


def search_entry(n: int = 0, **changes: Any) -> AuditEntry:
    """A search's row, `n` seconds after a minute ago, with `changes` applied."""
    base = AuditEntry(
        time=NOW - 60 + n,
        request_id=f"req-{n}",
        key_id="key-a",
        client_ip="10.0.0.1",
        method="POST",
        route="/v1/data/search",
        status=200,
        latency_ms=12.5,
    )
    return dataclasses.replace(base, **changes)


def entry(n: int) -> AuditEntry:
    return AuditEntry(
        time=time.time(),
        request_id=f"req-{n}",
        key_id="key-a",
        client_ip="10.0.0.1",
        method="GET",
        route="/v1/models",
        status=200,
        latency_ms=1.0,
    )


def write(log: AuditLog, count: int) -> None:
    for n in range(count):
        log.record(entry(n))
    assert log.flush() == count


def run_sql(path: Path, sql: str) -> None:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def from_file(path: Path) -> Checkpoint | None:
    try:
        return Checkpoint.from_json(path.read_text(), "file")
    except (OSError, ValueError):
        return None
