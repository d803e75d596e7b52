"""One way to open the gateway's databases: SQLite files by default, PostgreSQL when set.

Keys, audit, task and feedback rows live in the database of `DIFY_MIRROR_DATABASE_URL`
(a secret) or, on one machine, in one SQLite file each under `DIFY_MIRROR_HOME`
(`keys.db`, `audit.db`, `tasks.db`, `feedback.db`: apart, so the audit writer's
exclusive transactions never make a key lookup wait).
`postgresql://` URLs get the psycopg 3 driver; SQLite files run in WAL mode, and
writers wait for each other instead of failing with "database is locked".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

Database = Literal["keys", "audit", "tasks", "feedback"]


def sqlite_file(home: str | Path, which: Database) -> Path:
    """This machine's SQLite file for `which`."""
    return (Path(home) / f"{which}.db").resolve()


def database_url(home: str | Path, configured: str | None, which: Database) -> str:
    """The configured URL, else this machine's SQLite file for `which`."""
    return configured or f"sqlite:///{sqlite_file(home, which)}"


#: What a statement raises when the database fails it (`unreachable` tells which kind).
DatabaseError = sa.exc.DBAPIError


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached now (down, restarting, its
    connection dropped), not that a statement was wrong: a 503 worth a retry, not a 500."""
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


def create_engine(url: str, *, file_only: bool = False) -> Engine:
    """An engine for a SQLite or PostgreSQL URL; `file_only` refuses in-memory SQLite."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    if backend != "sqlite":
        raise ValueError(f"the database must be sqlite:/// or postgresql://, not {backend!r}")
    return _sqlite(parsed, file_only)


def _sqlite(url: URL, file_only: bool) -> Engine:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        if file_only:
            raise ValueError("this SQLite database needs a file path: sqlite:///path/to/file.db")
        return sa.create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30})
    sa.event.listen(engine, "connect", _wal)
    return engine


def _wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit survives the process crashing (it is in the WAL); only a
    # power cut can take the last commits. No fsync per transaction.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
