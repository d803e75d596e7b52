"""Which model served a request: read back from the request's own audit row.

Every guarded request leaves one audit row (`security/audit`) naming its key, route,
status and, for a request a model answered, the model (`name@version` once a model has
versions). That row is what a rating is checked against, so feedback needs no write on
the inference path: a request id is rateable by the key that made it when its row names
a model and its status is not an error.

The lookup reads the audit table directly, on its own read-only engine (the trail's
writer lives in another process, `ship.py`), by the key's index (`key_id`, `time`)
within the audit retention, newest first: a rating usually follows its answer closely,
so the scan stops early. A request id is the caller's `X-Request-ID` when it sent one,
so ids are not unique across keys or even within one key: the key's newest rateable
row with that id is the one rated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from dify_serving.security.audit.schema import LOG
from dify_serving.security.db import create_engine


@dataclass(frozen=True, slots=True)
class AuditedRequest:
    """What the audit row of one request says."""

    route: str
    status: int
    model: str | None
    time: float

    @property
    def rateable(self) -> bool:
        return bool(self.model) and self.status < 400


class ServedRequests:
    """Reads request rows from the audit database (SQLite file or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, file_only=True)
        self._table_seen = False

    def close(self) -> None:
        self.engine.dispose()

    def find(self, request_id: str, key_id: str | None, since: float) -> AuditedRequest | None:
        """The key's newest rateable row for `request_id` at or after `since`, else its
        newest row of any kind (to say why it cannot be rated), else None."""
        if not self._has_table():
            return None
        mine = (
            LOG.c.request_id == request_id,
            LOG.c.key_id.is_(None) if key_id is None else LOG.c.key_id == key_id,
            LOG.c.time >= since,
        )
        rateable = (LOG.c.model.is_not(None), LOG.c.model != "", LOG.c.status < 400)
        with self.engine.connect() as db:
            # newest first along the (key_id, time) index: LIMIT 1 stops at the first match
            newest = self._first(db, mine)
            if newest is None or newest.rateable:  # an unknown id costs one scan, not two
                return newest
            # a reused X-Request-ID (the rating itself may carry it): an older answer
            return self._first(db, (*mine, *rateable)) or newest

    @staticmethod
    def _first(db: sa.Connection, where: tuple[Any, ...]) -> AuditedRequest | None:
        query = sa.select(LOG.c.route, LOG.c.status, LOG.c.model, LOG.c.time).where(*where)
        row = db.execute(query.order_by(LOG.c.time.desc()).limit(1)).first()
        return None if row is None else AuditedRequest(str(row[0]), int(row[1]), row[2], row[3])

    def _has_table(self) -> bool:
        if not self._table_seen:
            self._table_seen = sa.inspect(self.engine).has_table(LOG.name)
        return self._table_seen
