"""`AuditTrail`: what the gateway, its routers and the CLI may ask of the audit trail.

Two classes implement it: `AuditLog` writes from its own thread (the CLI, tests, the
writer process), `AuditShipper` hands writes to a child process so the gateway's event
loop only appends to a list (`ship.py`). Callers type against this Protocol, so which
one they hold is decided where it is built and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, Unpack

from dify_serving.security.audit.entry import AuditEntry
from dify_serving.security.audit.query import AuditFilter, ExportFormat, Rows
from dify_serving.security.audit.verify import VerifyReport


class AuditTrail(Protocol):
    """A tamper-evident trail of requests: record, read back, verify, purge, shred."""

    @property
    def retention_days(self) -> int:
        """Rows older than this many days are removed by `purge`."""
        ...

    @property
    def dropped(self) -> int:
        """Entries recorded but lost (a full queue, an unstorable value, a dead writer)."""
        ...

    @property
    def pending(self) -> int:
        """Entries recorded here and not yet written."""
        ...

    def record(self, entry: AuditEntry) -> None:
        """Queue one entry; never blocks on the database and never raises."""
        ...

    def flush(self) -> int:
        """Write everything recorded so far; the rows written."""
        ...

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush and release the writer, waiting at most `timeout_s`."""
        ...

    def query(
        self, *, limit: int = 100, cursor: str | None = None, **where: Unpack[AuditFilter]
    ) -> Rows:
        """One page of rows in chain order and the next page's cursor (None: no more)."""
        ...

    def export(self, fmt: ExportFormat, **where: Unpack[AuditFilter]) -> Iterator[str]:
        """Matching rows as JSONL or CSV lines, streamed page by page."""
        ...

    def verify(self) -> VerifyReport:
        """Check the chain's links and every checkpoint outside the database."""
        ...

    def purge(self, now: float | None = None) -> int:
        """Remove the rows past retention (a chain prefix) and record it; rows removed."""
        ...

    def shred(self, subject: str) -> int:
        """Make `subject`'s request text unreadable in every row recorded so far, the chain
        unchanged (its key destroyed, `seal.py`); keys destroyed (0 or 1). Raises
        `AuditUnavailable` when that cannot be done now."""
        ...
