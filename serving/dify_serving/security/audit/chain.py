"""The audit trail's keyed hash chain: how a row is hashed, appended after the head, and
how a purge removes a prefix without breaking what is left.

Why it is built this way:

* **Keyed.** Each row's `hash` is HMAC-SHA256, keyed with the audit key (its own secret,
  else derived from the pepper; never in the database), over a canonical JSON array of
  the chain version, `seq`, every field and `prev_hash`. With plain SHA-256 anyone who
  can write the table can edit rows and re-hash everything after them; without the key
  a rebuilt chain fails at its first row.
* **One chain, many writers.** `append_rows` reads the head and inserts after it inside the
  caller's write transaction, which holds the chain lock (`schema.py`), so gateway
  processes sharing a database extend a single chain. `seq` is assigned here, not by an
  autoincrement, so a deleted row leaves a gap that verify reports as "chain broken", and
  an edited row no longer matches its hash ("hash mismatch").
* **Purges.** `remove_prefix` deletes a *prefix* of the chain: the rows before the first
  one still inside retention. A row's `time` is the request's, not its flush time, so
  rows are only roughly time-ordered; deleting by time alone could punch a hole in the
  middle, while a prefix never does and never removes anything newer than the cutoff.
  The last removed row's `(seq, hash)` becomes the anchor in `audit_anchor`, and the
  caller appends a purge row (`purge_entry`) repeating it in the same transaction, so a
  rewritten anchor is caught ("anchor not vouched for", `verify.py`). An anchor was
  chosen over re-hashing the survivors: a purge stays one DELETE and hashes already
  exported stay valid.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select

from dify_serving.security.audit.entry import COLUMNS, FIELDS, FLOATS, AuditEntry
from dify_serving.security.audit.schema import ANCHOR, LOG

GENESIS = "0" * 64
CHAIN_VERSION = "audit.v2"
PURGE_ROUTE = "audit.purge"
MIN_KEY_BYTES = 16
#: Hex characters of a subject's key reference (128 bits).
REF_CHARS = 32
_JSON_VERSION = f'"{CHAIN_VERSION}"'


@dataclass(frozen=True, slots=True)
class Head:
    """A position in the chain: the newest row's `seq` and `hash` (0 and GENESIS: empty)."""

    seq: int
    hash: str


#: Where an empty chain stands: row 0, linking to genesis.
EMPTY_HEAD = Head(0, GENESIS)


class ChainKey:
    """The HMAC key of the chain, held by the writer and `verify`, never by the database."""

    __slots__ = ("_base", "chain_id")

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"the audit key must be at least {MIN_KEY_BYTES} bytes (DIFY_MIRROR_AUDIT_KEY)"
            )
        self._base = hmac.new(key, digestmod=hashlib.sha256)
        #: Names this chain in checkpoints (and a Redis key) without revealing the key.
        self.chain_id = hmac.new(key, b"dify-mirror audit chain id", hashlib.sha256).hexdigest()[
            :16
        ]

    def __repr__(self) -> str:
        return f"ChainKey(chain_id={self.chain_id!r})"

    def subject_ref(self, subject: str) -> str:
        """Names a data subject's text key without naming the subject (`seal.py`)."""
        mac = self._base.copy()
        mac.update(b"dify-mirror audit text key\x00" + subject.encode())
        return mac.hexdigest()[:REF_CHARS]

    def digest(self, row: Mapping[str, Any]) -> str:
        """The hash of a stored row (a mapping with `seq`, the fields and `prev_hash`)."""
        return self.digest_values(row["seq"], tuple(row[name] for name in FIELDS), row["prev_hash"])

    def digest_values(self, seq: int, values: tuple[Any, ...], prev_hash: str) -> str:
        """HMAC-SHA256 over a canonical JSON array: version, seq, every field, prev_hash.

        The array is written by hand (strings through `json.dumps`, numbers by `repr`, the
        shortest round-trip form, which is what `json.dumps` writes too): the same bytes as
        `json.dumps(payload, separators=(",", ":"))`, at a third of the cost on the writer.
        """
        parts = [_JSON_VERSION, str(int(seq))]
        for name, value in zip(FIELDS, values, strict=True):
            if value is None:
                parts.append("null")
            elif name in FLOATS:
                parts.append(repr(float(value)))
            elif type(value) is str:
                parts.append(_json_str(value))
            else:
                parts.append(str(int(value)))
        parts.append(_json_str(prev_hash))
        mac = self._base.copy()
        mac.update(("[" + ",".join(parts) + "]").encode())
        return mac.hexdigest()


def _json_str(value: str) -> str:
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=True)


def append_rows(conn: Connection, rows: list[tuple[Any, ...]], chain: ChainKey) -> None:
    """Chain `rows` (values in `FIELDS` order, from `entry.storable`) after the head and
    insert them. The caller holds the chain lock."""
    last = chain_head(conn)
    seq, prev_hash = last.seq, last.hash
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


def chain_head(conn: Connection) -> Head:
    """The newest row; the anchor when a purge removed every row; else genesis."""
    last = conn.execute(select(LOG.c.seq, LOG.c.hash).order_by(LOG.c.seq.desc()).limit(1))
    row = last.first()
    return Head(int(row.seq), str(row.hash)) if row else (chain_anchor(conn) or EMPTY_HEAD)


def chain_anchor(conn: Connection) -> Head | None:
    """The last row a purge removed, which the oldest remaining row links to."""
    row = conn.execute(select(ANCHOR.c.seq, ANCHOR.c.hash)).first()
    return Head(int(row.seq), str(row.hash)) if row else None


def hash_at(conn: Connection, seq: int) -> str | None:
    found = conn.scalar(select(LOG.c.hash).where(LOG.c.seq == seq))
    return None if found is None else str(found)


def remove_prefix(conn: Connection, cutoff: float) -> int:
    """Delete rows before the first row at or after `cutoff`; anchor the chain at the last one."""
    first_kept = conn.scalar(select(func.min(LOG.c.seq)).where(LOG.c.time >= cutoff))
    candidates = select(LOG.c.seq, LOG.c.hash).order_by(LOG.c.seq.desc()).limit(1)
    if first_kept is not None:
        candidates = candidates.where(LOG.c.seq < first_kept)
    last_removed = conn.execute(candidates).first()
    if last_removed is None:
        return 0
    removed = conn.execute(delete(LOG).where(LOG.c.seq <= last_removed.seq)).rowcount
    conn.execute(delete(ANCHOR))
    conn.execute(insert(ANCHOR), {"id": 1, "seq": last_removed.seq, "hash": last_removed.hash})
    return int(removed)


def purge_entry(
    now: float, removed: int, cutoff: float, anchored: Head | None, latency_ms: float
) -> AuditEntry:
    """The row that records a purge and vouches for its anchor."""
    detail = {
        "removed": removed,
        "cutoff": cutoff,
        "anchor_seq": anchored.seq if anchored else None,
        "anchor_hash": anchored.hash if anchored else None,
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
