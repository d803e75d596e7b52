"""The audit trail's keyed hash chain, its checkpoints, and how a stored copy is judged.

Why it is built this way:

* **Keyed.** Each row's `hash` is HMAC-SHA256, keyed with the audit key (its own secret,
  else derived from the pepper; never in the database), over a canonical JSON array of
  the chain version, `seq`, every field and `prev_hash`. With plain SHA-256 anyone who
  can write the table can edit rows and re-hash everything after them; without the key
  a rebuilt chain fails at its first row.
* **Checkpointed.** A chain alone cannot show a missing *tail*: deleting the newest rows,
  or every row, leaves a valid shorter chain. So the writer copies the head (seq, hash,
  time) at least every `audit_checkpoint_s` to places outside the database
  (`audit_checkpoint.py`), and `verify` fails when a checkpoint names a row the chain no
  longer has, or a row whose hash differs. A checkpoint older than the newest rows is
  fine. This is Certificate Transparency's signed tree head, and PostgreSQL's
  `pg_control` checkpoint record, at the scale of one table.
* **No MAC on the checkpoint itself.** A head `(seq, hash)` is already keyed: without the
  key nobody can produce a pair that matches a chain, so a forged checkpoint is caught as
  a mismatch. The one forgery a MAC would not stop either is replaying an older genuine
  checkpoint; that is answered by keeping several independent copies (file, Redis,
  ConfigMap), by the writer never moving a checkpoint back or past a break, and by each
  place's own access control (the gateway may only patch its ConfigMap).
* **Purges.** A purge deletes a chain prefix and keeps the last removed row's
  `(seq, hash)` as the anchor; a purge row in the chain repeats it, so a rewritten anchor
  is caught ("anchor not vouched for"). Checkpoints older than the anchor are accepted:
  what they named was removed by retention, and the purge row vouches for that.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from dify_serving.security.audit_entry import FIELDS, FLOATS

GENESIS = "0" * 64
CHAIN_VERSION = "audit.v2"
PURGE_ROUTE = "audit.purge"
MIN_KEY_BYTES = 16
HASH_MISMATCH = "hash mismatch"
CHAIN_BROKEN = "chain broken"
ANCHOR_UNVOUCHED = "anchor not vouched for by a purge row"
TAIL_MISSING = "tail missing: the chain ends before the checkpoint"
CHECKPOINT_MISMATCH = "chain differs from the checkpoint"
OTHER_CHAIN = "checkpoint of another chain (a different audit key)"
CHECKPOINT_UNREADABLE = "checkpoint unreadable"
_JSON_VERSION = f'"{CHAIN_VERSION}"'
_HASH = re.compile(r"[0-9a-f]{64}")
_CHAIN_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class Head:
    """A position in the chain: the newest row's `seq` and `hash` (0 and GENESIS: empty)."""

    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The head as it was at `time`, kept outside the database; `source` says where."""

    seq: int
    hash: str
    time: float
    chain: str
    source: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": CHAIN_VERSION,
                "chain": self.chain,
                "seq": self.seq,
                "hash": self.hash,
                "time": self.time,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Checkpoint:
        """Parse what `to_json` wrote; ValueError for anything else."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("version") != CHAIN_VERSION:
            raise ValueError(f"{source}: not an {CHAIN_VERSION} checkpoint")
        seq, digest, stamp, chain = (data.get(k) for k in ("seq", "hash", "time", "chain"))
        if (
            type(seq) is not int
            or not 0 <= seq < 2**63
            or not isinstance(digest, str)
            or not _HASH.fullmatch(digest)
            or not isinstance(stamp, int | float)
            or isinstance(stamp, bool)
            or not math.isfinite(stamp)
            or not isinstance(chain, str)
            or not _CHAIN_ID.fullmatch(chain)
        ):
            raise ValueError(f"{source}: malformed checkpoint")
        return cls(seq, digest, float(stamp), chain, source)

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "time": self.time, "source": self.source}


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


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of `verify`: `first_bad_seq` is the first row that fails (or is missing)."""

    ok: bool
    rows_checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    head: Head = Head(0, GENESIS)
    checkpoint: Checkpoint | None = None

    def summary(self) -> str:
        """Lines for a CLI or a log: the verdict, the head found, the checkpoint compared."""
        if self.ok:
            verdict = f"audit chain ok: {self.rows_checked} rows"
        elif self.first_bad_seq is None:
            verdict = f"audit chain NOT VERIFIED: {self.reason}"
        else:
            verdict = f"audit chain BROKEN at seq {self.first_bad_seq}: {self.reason}"
        lines = [verdict, f"head:       seq {self.head.seq} hash {self.head.hash}"]
        point = self.checkpoint
        if point is None:
            lines.append("checkpoint: none found (a missing tail cannot be detected)")
        else:
            stamp = datetime.fromtimestamp(point.time, UTC).isoformat(timespec="seconds")
            lines.append(
                f"checkpoint: seq {point.seq} hash {point.hash} at {stamp} ({point.source})"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The report for scripts (`dify-mirror audit verify --json`)."""
        return {
            "ok": self.ok,
            "rows_checked": self.rows_checked,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "head": {"seq": self.head.seq, "hash": self.head.hash},
            "checkpoint": None if self.checkpoint is None else self.checkpoint.as_dict(),
        }


def walk(
    key: ChainKey, rows: Iterable[Mapping[str, Any]], anchor: Head | None, wanted: set[int]
) -> tuple[VerifyReport, dict[int, str]]:
    """Check every link from the anchor (or genesis); also return the hashes at `wanted` seqs."""
    expected_seq, prev_hash = (anchor.seq + 1, anchor.hash) if anchor else (1, GENESIS)
    vouched = anchor is None
    checked = 0
    hashes: dict[int, str] = {}
    for row in rows:
        problem = _link_problem(key, row, expected_seq, prev_hash)
        if problem:
            return VerifyReport(False, checked, row["seq"], problem), hashes
        checked += 1
        expected_seq, prev_hash = row["seq"] + 1, row["hash"]
        if row["seq"] in wanted:
            hashes[row["seq"]] = row["hash"]
        vouched = vouched or _vouches_for(row, anchor)
    if not vouched:
        assert anchor is not None
        return VerifyReport(False, checked, anchor.seq, ANCHOR_UNVOUCHED), hashes
    return VerifyReport(True, checked), hashes


def checkpoint_problem(
    point: Checkpoint, found_hash: str | None, anchor: Head | None, head: Head, chain_id: str
) -> tuple[str, int] | None:
    """Why the chain does not hold `point` (reason, first bad seq), or None when it does.

    `found_hash` is the stored hash of row `point.seq` (None when there is no such row).
    """
    if point.chain != chain_id:
        return OTHER_CHAIN, point.seq
    if point.seq > head.seq:
        return TAIL_MISSING, head.seq + 1
    if anchor is not None and point.seq <= anchor.seq:
        if point.seq < anchor.seq:
            return None  # removed by retention; the purge row vouches for the anchor
        found_hash = anchor.hash
    elif point.seq == 0:
        found_hash = GENESIS
    return None if found_hash == point.hash else (CHECKPOINT_MISMATCH, point.seq)


def judge(
    walked: VerifyReport,
    head: Head,
    anchor: Head | None,
    hashes: Mapping[int, str],
    points: list[Checkpoint],
    unreadable: list[str],
    chain_id: str,
) -> VerifyReport:
    """The final report: the chain's own links first, then every checkpoint, newest first."""
    ordered = sorted(points, key=lambda p: (p.seq, p.time), reverse=True)
    report = replace(walked, head=head, checkpoint=ordered[0] if ordered else None)
    if not walked.ok:
        return report
    for point in ordered:
        problem = checkpoint_problem(point, hashes.get(point.seq), anchor, head, chain_id)
        if problem is not None:
            reason, first_bad = problem
            return replace(
                report, ok=False, first_bad_seq=first_bad, reason=reason, checkpoint=point
            )
    if unreadable:
        return replace(report, ok=False, reason=f"{CHECKPOINT_UNREADABLE}: {'; '.join(unreadable)}")
    return report


def _link_problem(
    key: ChainKey, row: Mapping[str, Any], expected_seq: int, prev_hash: str
) -> str | None:
    if row["seq"] != expected_seq or row["prev_hash"] != prev_hash:
        return CHAIN_BROKEN
    if key.digest(row) != row["hash"]:
        return HASH_MISMATCH
    return None


def _vouches_for(row: Mapping[str, Any], anchor: Head | None) -> bool:
    if anchor is None or row["route"] != PURGE_ROUTE or not row["detail"]:
        return False
    try:
        detail = json.loads(row["detail"])
    except ValueError:
        return False
    return bool(detail.get("anchor_seq") == anchor.seq and detail.get("anchor_hash") == anchor.hash)
