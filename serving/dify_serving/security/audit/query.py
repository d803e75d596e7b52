"""Reading the trail back: filters, keyset pages, and JSONL/CSV export.

Queries are keyset-paged by `seq` with an opaque cursor and a limit clamped to
1..`MAX_QUERY_LIMIT`, and exports page internally on a fresh connection per page, so any
time range costs bounded memory and never holds a transaction open while a client reads
slowly. Every filter value is a bound parameter. CSV cells a spreadsheet would evaluate
as formulas are prefixed with `'`; JSONL is the lossless format. Sealed request text is
shown decrypted, or erased once its subject's key is gone (`seal.py`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypedDict

from sqlalchemy import ColumnElement, Connection, select

from dify_serving.security.audit.entry import COLUMNS
from dify_serving.security.audit.schema import LOG, AuditDatabase
from dify_serving.security.audit.seal import unseal_rows

MAX_QUERY_LIMIT = 1000
EXPORT_PAGE_ROWS = 1000
_CURSOR = re.compile(r"seq:(\d{1,18})")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

ExportFormat = Literal["jsonl", "csv"]
Rows = tuple[list[dict[str, Any]], str | None]


class AuditFilter(TypedDict, total=False):
    """What `query` and `export` select by (`since` inclusive, `until` exclusive)."""

    since: float | None
    until: float | None
    key_id: str | None
    route: str | None
    status: int | None
    client_ip: str | None


_FILTER_NAMES = frozenset(AuditFilter.__annotations__)


def conditions(where: AuditFilter) -> list[ColumnElement[bool]]:
    """The filters as SQL conditions; TypeError names an unknown filter."""
    unknown = sorted(set(where) - _FILTER_NAMES)
    if unknown:
        raise TypeError(f"unknown audit filter(s): {', '.join(unknown)}")
    found: list[ColumnElement[bool]] = []
    if (since := where.get("since")) is not None:
        found.append(LOG.c.time >= float(since))
    if (until := where.get("until")) is not None:
        found.append(LOG.c.time < float(until))
    if (status := where.get("status")) is not None:
        found.append(LOG.c.status == int(status))
    for name in ("key_id", "route", "client_ip"):
        if (value := where.get(name)) is not None:
            found.append(LOG.c[name] == value)
    return found


def query_page(
    db: AuditDatabase, where: AuditFilter, limit: int = 100, cursor: str | None = None
) -> Rows:
    """One page of rows in chain order, and the cursor of the next (None: the last page)."""
    selected = conditions(where)
    after = 0 if cursor is None else decode_cursor(cursor)
    size = max(1, min(int(limit), MAX_QUERY_LIMIT))
    db.ensure_schema()
    with db.connect() as conn:
        rows = unseal_rows(conn, page(conn, selected, after, size + 1))
    if len(rows) <= size:
        return rows, None
    return rows[:size], encode_cursor(rows[size - 1]["seq"])


def export_lines(db: AuditDatabase, fmt: ExportFormat, where: AuditFilter) -> Iterator[str]:
    """Matching rows as newline-terminated JSONL or CSV lines, read page by page."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"export format must be 'jsonl' or 'csv', not {fmt!r}")
    rows = _scan(db, conditions(where))
    return _jsonl_lines(rows) if fmt == "jsonl" else _csv_lines(rows)


def page(
    conn: Connection, selected: list[ColumnElement[bool]], after: int, size: int
) -> list[dict[str, Any]]:
    """Up to `size` rows after `seq` `after`, oldest first."""
    statement = select(LOG).where(*selected, LOG.c.seq > after)
    result = conn.execute(statement.order_by(LOG.c.seq).limit(size))
    return [dict(row) for row in result.mappings()]


def pages(
    conn: Connection, selected: list[ColumnElement[bool]], after: int, size: int
) -> Iterator[dict[str, Any]]:
    """Every matching row after `after`, `size` at a time, on one connection (verify's
    snapshot)."""
    while True:
        rows = page(conn, selected, after, size)
        yield from rows
        if len(rows) < size:
            return
        after = rows[-1]["seq"]


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


def _scan(db: AuditDatabase, selected: list[ColumnElement[bool]]) -> Iterator[dict[str, Any]]:
    db.ensure_schema()
    after = 0
    while True:
        with db.connect() as conn:
            rows = unseal_rows(conn, page(conn, selected, after, EXPORT_PAGE_ROWS))
        yield from rows
        if len(rows) < EXPORT_PAGE_ROWS:
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
