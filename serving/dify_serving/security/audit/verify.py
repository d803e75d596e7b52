"""How a stored chain is judged: every link from the anchor, then every checkpoint.

A chain alone cannot show a missing *tail*: deleting the newest rows, or every row,
leaves a valid shorter chain. So the writer copies the head (seq, hash, time) at least
every `audit_checkpoint_s` to places outside the database (`checkpoint.py`), and verify
fails when a checkpoint names a row the chain no longer has, or a row whose hash
differs. A checkpoint older than the newest rows is fine. This is Certificate
Transparency's signed tree head, and PostgreSQL's `pg_control` checkpoint record, at the
scale of one table. Checkpoints older than the anchor are accepted: what they named was
removed by retention, and the purge row vouches for that (`chain.py`).

The functions here are pure: `AuditLog.verify` reads the rows and checkpoints and hands
them over, so each verdict is tested without a database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from dify_serving.security.audit.chain import EMPTY_HEAD, GENESIS, PURGE_ROUTE, ChainKey, Head
from dify_serving.security.audit.checkpoint import Checkpoint

HASH_MISMATCH = "hash mismatch"
CHAIN_BROKEN = "chain broken"
ANCHOR_UNVOUCHED = "anchor not vouched for by a purge row"
TAIL_MISSING = "tail missing: the chain ends before the checkpoint"
CHECKPOINT_MISMATCH = "chain differs from the checkpoint"
OTHER_CHAIN = "checkpoint of another chain (a different audit key)"
CHECKPOINT_UNREADABLE = "checkpoint unreadable"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of `verify`: `first_bad_seq` is the first row that fails (or is missing)."""

    ok: bool
    rows_checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    head: Head = EMPTY_HEAD
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
