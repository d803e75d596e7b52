"""The audit tables, and how each backend opens the transactions the chain needs.

Writers serialise on the chain's head: reading it and inserting the batch after it must
happen under one database-wide lock, or two gateway processes sharing a database would
fork the chain. PostgreSQL takes `pg_advisory_xact_lock` inside the transaction;
SQLite (WAL mode, from `security/db.py`) opens write transactions with `BEGIN IMMEDIATE`,
which takes the file's write lock at once instead of at the first write. Readers that
walk the chain page by page (verify) get one consistent view: `REPEATABLE READ` on
PostgreSQL, a plain `BEGIN` on SQLite.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    exc,
    inspect,
    text,
)

from dify_serving.security.db import create_engine

#: A batch the database refuses for its content (not for an outage): retrying cannot help.
ROW_ERRORS = (exc.DataError, exc.IntegrityError)
_WRITE_OPTION = "audit_write"
_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"dify_mirror.audit_log").digest()[:8], "big", signed=True
)

METADATA = MetaData()
LOG = Table(
    "audit_log",
    METADATA,
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
Index("ix_audit_log_time", LOG.c.time)
Index("ix_audit_log_key_id_time", LOG.c.key_id, LOG.c.time)
Index("ix_audit_log_route_time", LOG.c.route, LOG.c.time)
# Feedback finds the request it rates by id (`feedback/served.py`): without this index a
# lookup deep in a busy key's history scanned its (key_id, time) rows for seconds.
Index("ix_audit_log_request_id", LOG.c.request_id)
# No index on status or client_ip: each one costs every insert a B-tree write, and those
# filters are answered by scanning in `seq` order within the page bound (and usually a
# time range), which stays cheap.
ANCHOR = Table(
    "audit_anchor",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

#: One AES-256 key per data subject whose request text was sealed (`seal.py`), named by
#: a keyed hash of the subject (never the subject itself). Erasure blanks the key and
#: records when (`erased`): a row recorded before that time and written after it, by any
#: replica's writer, is written erased; text recorded later gets a new key.
TEXT_KEYS = Table(
    "audit_text_keys",
    METADATA,
    Column("ref", String(64), primary_key=True),
    Column("key", String(64), nullable=False),  # hex; "" once destroyed
    Column("created", Double, nullable=False),
    Column("erased", Double),  # time of the subject's last erasure
)


class AuditDatabase:
    """The audit tables on one SQLite file or PostgreSQL database; created on first use."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, file_only=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._write_engine = self.engine.execution_options(**{_WRITE_OPTION: True})
        self._ready = False

    def ensure_schema(self) -> None:
        """Create the tables unless this process already did (cheap after the first call)."""
        if self._ready:
            return
        with self.write_transaction() as conn:
            METADATA.create_all(conn)
            for index in LOG.indexes:  # create_all adds none to a table from an older release
                index.create(conn, checkfirst=True)
            present = {c["name"] for c in inspect(conn).get_columns(TEXT_KEYS.name)}
            if "erased" not in present:  # a table from before erasure times were kept
                kind = TEXT_KEYS.c.erased.type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {TEXT_KEYS.name} ADD COLUMN erased {kind}"))
        self._ready = True

    @contextmanager
    def write_transaction(self) -> Iterator[Connection]:
        """A transaction that holds the chain lock: no other writer can read or move the head."""
        with self._write_engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read transaction with one consistent view across pages."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def connect(self) -> Connection:
        """A plain connection for one bounded read (a query page)."""
        return self.engine.connect()

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we say BEGIN (IMMEDIATE) ourselves


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE_OPTION)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
