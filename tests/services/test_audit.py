"""The audit trail, run against both stores: SQLite (a file in tmp_path) and PostgreSQL.

The chain is keyed (`KEY`); the tail tests keep the head in a checkpoint file as the
gateway does, then take rows away and expect `verify` to fail.

PostgreSQL tests use a throwaway database created for the session on 127.0.0.1:5432 and dropped
at the end; they are skipped, with the reason, when no server answers there (under CI
they fail instead). Without a database server (an unreachable one, SQLite under home
shared by the gateway's writer and the CLI): `tests/unit/test_audit.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_chain import LOG_KEY as KEY
from audit_chain import NOW
from audit_chain import search_entry as entry
from sqlalchemy import create_engine, text
from support import require_service, wait_for

from dify_serving.security import audit
from dify_serving.security.audit import (
    GENESIS,
    AuditEntry,
    AuditLog,
    ChainKey,
    CheckpointPlaces,
)
from dify_serving.security.audit import query as audit_query

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
DAY = 86_400.0

OpenLog = Callable[..., AuditLog]


def maintenance(sql: str) -> None:
    engine = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"dify_audit_test_{uuid.uuid4().hex[:12]}"
    require_service("PostgreSQL", lambda: maintenance(f'CREATE DATABASE "{name}"'))
    yield f"{PG_SERVER}/{name}"
    maintenance(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    pg: str = request.getfixturevalue("pg_url")
    run_sql(pg, "DROP TABLE IF EXISTS audit_log, audit_anchor, audit_text_keys")
    return pg


@pytest.fixture()
def open_log(url: str) -> Iterator[OpenLog]:
    opened: list[AuditLog] = []

    def make(**kw: Any) -> AuditLog:
        kw.setdefault("flush_interval_s", 60.0)
        kw.setdefault("key", KEY)
        log = AuditLog(url, **kw)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def run_sql(url: str, sql: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def filled(open_log: OpenLog, entries: list[AuditEntry], **kw: Any) -> AuditLog:
    log = open_log(**kw)
    for item in entries:
        log.record(item)
    assert log.flush() == len(entries)
    return log


def all_rows(log: AuditLog, **filters: Any) -> list[dict[str, Any]]:
    rows, cursor = log.query(limit=1000, **filters)
    assert cursor is None
    return rows


def outcome(report: audit.VerifyReport) -> tuple[bool, int, int | None, str | None]:
    return report.ok, report.rows_checked, report.first_bad_seq, report.reason


def test_round_trip_keeps_every_field(open_log: OpenLog) -> None:
    full = AuditEntry(
        time=1_750_000_000.123456,
        request_id="req-full",
        key_id="key-1",
        client_ip="2001:db8::7",
        method="POST",
        route="/v1/chat/completions",
        status=429,
        latency_ms=3.25,
        model="tiny-chat",
        index="docs",
        prompt_tokens=17,
        completion_tokens=42,
        bytes_in=1024,
        bytes_out=2048,
        detail=json.dumps({"reason": "rate limited"}),
    )
    log = filled(open_log, [full])
    [row] = all_rows(log)
    assert {name: row[name] for name in audit.FIELDS} == dataclasses.asdict(full)
    assert row["seq"] == 1 and row["prev_hash"] == GENESIS and len(row["hash"]) == 64


def test_writes_are_batched_until_flush(open_log: OpenLog) -> None:
    log = open_log()
    for n in range(50):
        log.record(entry(n))
    assert log.pending == 50
    assert all_rows(log) == []
    assert log.flush() == 50
    assert log.pending == 0 and len(all_rows(log)) == 50


def test_writer_flushes_on_interval_and_on_full_batch(open_log: OpenLog) -> None:
    timed = open_log(flush_interval_s=0.05)
    timed.record(entry(1))
    assert wait_for(lambda: len(all_rows(timed)) == 1)
    batched = open_log(max_batch=10)
    for n in range(10):
        batched.record(entry(n))
    assert wait_for(lambda: len(all_rows(batched)) == 1 + 10)


def test_record_is_cheap(open_log: OpenLog) -> None:
    log = open_log(max_batch=100_000)
    item = entry()
    started = time.perf_counter()
    for _ in range(20_000):
        log.record(item)
    assert (time.perf_counter() - started) / 20_000 < 50e-6


def test_filters(open_log: OpenLog) -> None:
    log = filled(
        open_log,
        [
            entry(0, time=1000.0),
            entry(1, time=2000.0, key_id="key-b", status=401),
            entry(2, time=3000.0, route="/v1/models", client_ip="10.0.0.2"),
            entry(3, time=4000.0, key_id=None, status=403, client_ip=None),
        ],
    )

    def ids(**filters: Any) -> list[str]:
        return [row["request_id"] for row in all_rows(log, **filters)]

    assert ids(since=2000.0) == ["req-1", "req-2", "req-3"]
    assert ids(until=2000.0) == ["req-0"]
    assert ids(since=2000.0, until=4000.0) == ["req-1", "req-2"]
    assert ids(key_id="key-b") == ["req-1"]
    assert ids(route="/v1/models") == ["req-2"]
    assert ids(status=403) == ["req-3"]
    assert ids(client_ip="10.0.0.2") == ["req-2"]
    assert ids(key_id="key-a", route="/v1/data/search") == ["req-0"]


def test_cursor_pages_without_overlap_or_gap(open_log: OpenLog) -> None:
    log = filled(open_log, [entry(n) for n in range(250)])
    pages, cursor = [], None
    while True:
        rows, cursor = log.query(limit=100, cursor=cursor)
        pages.append([row["seq"] for row in rows])
        if cursor is None:
            break
    assert [len(page) for page in pages] == [100, 100, 50]
    assert [seq for page in pages for seq in page] == list(range(1, 251))


def test_limit_is_clamped(open_log: OpenLog) -> None:
    log = filled(open_log, [entry(n) for n in range(1005)])
    rows, cursor = log.query(limit=0)
    assert len(rows) == 1 and cursor is not None
    rows, cursor = log.query(limit=10**6)
    assert len(rows) == audit.MAX_QUERY_LIMIT and cursor is not None
    rest, end = log.query(limit=10**6, cursor=cursor)
    assert len(rest) == 5 and end is None


@pytest.mark.parametrize("cursor", ["", "!!!", "c2VxOmFiYw", "bm90IGEgY3Vyc29y", "x" * 500])
def test_malformed_cursor_is_refused(open_log: OpenLog, cursor: str) -> None:
    with pytest.raises(ValueError, match="malformed audit cursor"):
        open_log().query(cursor=cursor)


def test_hostile_filter_values_match_nothing(open_log: OpenLog) -> None:
    hostile = "x' OR 1=1 --"
    log = filled(open_log, [entry(0), entry(1, key_id=hostile, route="/v1/'; DROP TABLE x; --")])
    assert all_rows(log, key_id="' OR '1'='1") == []
    assert all_rows(log, route="x' OR 1=1 --") == []
    assert all_rows(log, client_ip="1' OR 1=1 --") == []
    assert all_rows(log, route="/v1/data/search' --") == []
    assert [row["request_id"] for row in all_rows(log, key_id=hostile)] == ["req-1"]
    assert len(all_rows(log)) == 2


def test_verify_accepts_an_intact_chain(open_log: OpenLog) -> None:
    log = filled(open_log, [entry(n) for n in range(20)], max_batch=7)
    report = log.verify()
    assert report.ok and report.rows_checked == 20 and report.first_bad_seq is None
    assert report.summary().splitlines()[0] == "audit chain ok: 20 rows"


def test_verify_detects_an_edited_row(open_log: OpenLog, url: str) -> None:
    log = filled(open_log, [entry(n) for n in range(20)])
    run_sql(url, "UPDATE audit_log SET status = 500 WHERE seq = 7")
    report = log.verify()
    assert not report.ok
    assert (report.first_bad_seq, report.reason) == (7, audit.HASH_MISMATCH)
    assert report.rows_checked == 6


def test_verify_detects_a_deleted_row(open_log: OpenLog, url: str) -> None:
    log = filled(open_log, [entry(n) for n in range(20)])
    run_sql(url, "DELETE FROM audit_log WHERE seq = 7")
    report = log.verify()
    assert not report.ok
    assert (report.first_bad_seq, report.reason) == (8, audit.CHAIN_BROKEN)


def test_purge_removes_old_rows_records_itself_and_still_verifies(open_log: OpenLog) -> None:
    old = [entry(n, time=NOW - 200 * DAY + n) for n in range(3)]
    recent = [entry(n, time=NOW - 10 * DAY + n) for n in range(3, 5)]
    log = filled(open_log, old + recent)
    assert log.purge(now=NOW) == 3
    rows = all_rows(log)
    assert [row["request_id"] for row in rows[:2]] == ["req-3", "req-4"]
    purge_row = rows[-1]
    assert purge_row["route"] == audit.PURGE_ROUTE and purge_row["seq"] == 6
    detail = json.loads(purge_row["detail"])
    assert detail["removed"] == 3 and detail["cutoff"] == NOW - 180 * DAY
    assert detail["anchor_seq"] == 3
    assert outcome(log.verify()) == (True, 3, None, None)
    log.record(entry(9))
    log.flush()
    assert log.purge(now=NOW + 200 * DAY) == 4
    assert log.verify().ok and len(all_rows(log)) == 1


def test_purge_never_removes_rows_inside_retention(open_log: OpenLog) -> None:
    log = filled(
        open_log,
        [entry(0, time=NOW - 300 * DAY), entry(1), entry(2, time=NOW - 300 * DAY)],
    )
    assert log.purge(now=NOW) == 1
    assert [row["request_id"] for row in all_rows(log)][:2] == ["req-1", "req-2"]
    assert log.verify().ok


def test_verify_detects_tampering_after_purge(open_log: OpenLog, url: str) -> None:
    log = filled(open_log, [entry(n, time=NOW - 300 * DAY) for n in range(3)] + [entry(3)])
    log.purge(now=NOW)
    run_sql(url, "DELETE FROM audit_log WHERE seq = 4")
    assert log.verify().reason == audit.CHAIN_BROKEN
    run_sql(url, "UPDATE audit_anchor SET seq = 4, hash = (SELECT prev_hash FROM audit_log)")
    report = log.verify()
    assert (report.ok, report.reason) == (False, audit.ANCHOR_UNVOUCHED)


def places(tmp_path: Path) -> CheckpointPlaces:
    return CheckpointPlaces(file=str(tmp_path / "audit-checkpoint.json"))


def checkpointed(open_log: OpenLog, tmp_path: Path, rows: int = 20) -> AuditLog:
    """A log of `rows` rows whose head is checkpointed in a file, as the gateway keeps it.

    Only when the test says so: the writer's own first checkpoint would otherwise land at
    a moment its thread picks (`checkpoint_s=None`).
    """
    log = filled(
        open_log,
        [entry(n) for n in range(rows)],
        checkpoints=places(tmp_path),
        checkpoint_s=None,
    )
    log.checkpoint()
    return log


def rewrite(url: str, rows: list[dict[str, Any]]) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for row in rows:
                conn.execute(
                    text(
                        "UPDATE audit_log SET status = :status, prev_hash = :prev_hash, "
                        "hash = :hash WHERE seq = :seq"
                    ),
                    {name: row[name] for name in ("seq", "status", "prev_hash", "hash")},
                )
    finally:
        engine.dispose()


def unkeyed_sha256(row: dict[str, Any]) -> str:
    """The published unkeyed chain (audit.v1): what anyone with write access could compute."""
    payload = ["audit.v1", row["seq"], *(row[name] for name in audit.FIELDS), row["prev_hash"]]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def test_verify_fails_when_the_newest_rows_are_deleted(
    open_log: OpenLog, url: str, tmp_path: Path
) -> None:
    log = checkpointed(open_log, tmp_path)
    run_sql(url, "DELETE FROM audit_log WHERE seq > 17")
    report = log.verify()
    assert outcome(report) == (False, 17, 18, audit.TAIL_MISSING)
    assert report.head.seq == 17 and report.checkpoint is not None
    assert report.checkpoint.seq == 20
    lines = report.summary().splitlines()
    assert lines[0] == f"audit chain BROKEN at seq 18: {audit.TAIL_MISSING}"
    assert lines[1] == f"head:       seq 17 hash {report.head.hash}"
    assert lines[2].startswith(f"checkpoint: seq 20 hash {report.checkpoint.hash} at ")


@pytest.mark.parametrize(
    "statements",
    [["DELETE FROM audit_log"], ["DROP TABLE audit_log", "DROP TABLE audit_anchor"]],
    ids=["emptied", "dropped"],
)
def test_verify_fails_when_every_row_is_gone(
    open_log: OpenLog, url: str, tmp_path: Path, statements: list[str]
) -> None:
    checkpointed(open_log, tmp_path)
    for sql in statements:
        run_sql(url, sql)
    report = open_log(checkpoints=places(tmp_path), checkpoint_s=None).verify()
    assert outcome(report) == (False, 0, 1, audit.TAIL_MISSING)
    assert report.head == audit.Head(0, GENESIS)


@pytest.mark.parametrize("forger", ["plain sha256", "wrong key", "the audit key"])
def test_a_rebuilt_chain_fails_without_the_key_and_against_the_checkpoint_with_it(
    open_log: OpenLog, url: str, tmp_path: Path, forger: str
) -> None:
    log = checkpointed(open_log, tmp_path)
    digest = {
        "plain sha256": unkeyed_sha256,
        "wrong key": ChainKey(b"not-the-audit-key-0123456789abcd").digest,
        "the audit key": ChainKey(KEY).digest,
    }[forger]
    rows = all_rows(log)
    rows[6]["status"] = 500  # the change to hide; every later row re-chained
    prev_hash = rows[5]["hash"]
    for row in rows[6:]:
        row["prev_hash"] = prev_hash
        row["hash"] = prev_hash = digest(row)
    rewrite(url, rows[6:])
    report = log.verify()
    if forger == "the audit key":  # a key holder's rewrite still ends in another head
        assert outcome(report) == (False, 20, 20, audit.CHECKPOINT_MISMATCH)
    else:
        assert outcome(report) == (False, 6, 7, audit.HASH_MISMATCH)


def test_the_writer_never_moves_a_checkpoint_past_a_missing_tail(
    open_log: OpenLog, url: str, tmp_path: Path
) -> None:
    log = checkpointed(open_log, tmp_path, rows=10)
    run_sql(url, "DELETE FROM audit_log WHERE seq > 7")
    for n in range(10, 15):
        log.record(entry(n))
    assert log.flush() == 5  # seq 8..12, chained with the key onto the shortened chain
    log.checkpoint()
    report = log.verify()
    assert outcome(report) == (False, 12, 10, audit.CHECKPOINT_MISMATCH)
    assert report.head.seq == 12 and report.checkpoint is not None
    assert report.checkpoint.seq == 10


def test_rows_newer_than_the_checkpoint_are_fine(open_log: OpenLog, tmp_path: Path) -> None:
    log = checkpointed(open_log, tmp_path, rows=10)
    for n in range(10, 15):
        log.record(entry(n))
    log.flush()
    report = log.verify()
    assert outcome(report) == (True, 15, None, None)
    assert report.head.seq == 15 and report.checkpoint is not None
    assert report.checkpoint.seq == 10


@pytest.mark.parametrize("checkpoint_at", [2, 3])
def test_a_checkpoint_at_or_before_the_purge_anchor_verifies(
    open_log: OpenLog, tmp_path: Path, checkpoint_at: int
) -> None:
    old = [entry(n, time=NOW - 300 * DAY + n) for n in range(3)]
    log = filled(open_log, old[:checkpoint_at], checkpoints=places(tmp_path), checkpoint_s=None)
    log.checkpoint()
    for item in [*old[checkpoint_at:], entry(3)]:
        log.record(item)
    log.flush()
    assert log.purge(now=NOW) == 3
    report = log.verify()
    assert outcome(report) == (True, 2, None, None)
    assert report.checkpoint is not None and report.checkpoint.seq == checkpoint_at


def test_a_checkpoint_of_another_chain_fails_and_is_left_alone(
    open_log: OpenLog, tmp_path: Path
) -> None:
    other_key = b"another-audit-key-0123456789abcd"
    open_log(key=other_key, checkpoints=places(tmp_path)).checkpoint()
    log = filled(open_log, [entry(0)], checkpoints=places(tmp_path))
    log.checkpoint()
    report = log.verify()
    assert outcome(report)[::3] == (False, audit.OTHER_CHAIN)
    assert report.checkpoint is not None
    assert report.checkpoint.chain == ChainKey(other_key).chain_id


def test_a_short_key_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        AuditLog(url, key=b"short")


def test_short_retention_is_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ValueError, match="180-day minimum"):
        AuditLog(url, key=KEY, retention_days=30)
    log = AuditLog(url, key=KEY, retention_days=30, allow_short_retention=True)
    log.close()
    assert log.retention_days == 30


def test_export_jsonl_and_csv_parse_back(
    open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_query, "EXPORT_PAGE_ROWS", 7)
    items = [entry(n, status=200 if n % 2 else 404) for n in range(20)]
    items.append(entry(20, key_id='=HYPERLINK("http://x")', detail='a,b\n"c"'))
    log = filled(open_log, items)
    rows = all_rows(log)
    parsed = [json.loads(line) for line in log.export("jsonl")]
    assert parsed == rows
    assert [row["seq"] for row in map(json.loads, log.export("jsonl", status=404))] == list(
        range(1, 21, 2)
    )
    table = list(csv.DictReader(io.StringIO("".join(log.export("csv")))))
    assert [int(row["seq"]) for row in table] == [row["seq"] for row in rows]
    assert table[0]["request_id"] == "req-0" and float(table[0]["time"]) == rows[0]["time"]
    assert table[-1]["key_id"] == '\'=HYPERLINK("http://x")'
    assert table[-1]["detail"] == 'a,b\n"c"'
    with pytest.raises(ValueError, match="jsonl"):
        log.export("xml")  # type: ignore[arg-type]


def test_two_logs_writing_concurrently_keep_one_chain(open_log: OpenLog) -> None:
    logs = [open_log(flush_interval_s=0.01, max_batch=16) for _ in range(2)]

    def write(log: AuditLog, worker: int) -> None:
        for n in range(150):
            log.record(entry(n, request_id=f"w{worker}-{n}"))

    workers = [threading.Thread(target=write, args=(logs[i % 2], i)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for log in logs:
        log.close()
    checker = open_log()
    assert outcome(checker.verify()) == (True, 600, None, None)
    seqs = [json.loads(line)["seq"] for line in checker.export("jsonl")]
    assert seqs == list(range(1, 601))


def test_unstorable_entries_are_dropped_and_counted(open_log: OpenLog) -> None:
    log = open_log()
    log.record(entry(0, time=float("nan")))
    log.record(entry(1, route=""))
    log.record(entry(2, request_id="nul\x00byte", key_id="\ud800"))
    assert log.flush() == 1
    assert log.dropped == 2
    [row] = all_rows(log)
    assert row["request_id"] == "nul\ufffdbyte" and row["key_id"] == "?"
    assert log.verify().ok


def test_entries_survive_an_outage(pg_url: str) -> None:
    name = f"dify_audit_late_{uuid.uuid4().hex[:12]}"
    log = AuditLog(f"{PG_SERVER}/{name}", key=KEY)
    try:
        for n in range(3):
            log.record(entry(n))
        assert log.flush() == 0 and log.pending == 3
        maintenance(f'CREATE DATABASE "{name}"')
        assert log.flush() == 3
        assert log.verify().ok
    finally:
        log.close()
        maintenance(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_shredded_subject_text_reads_erased_and_the_chain_verifies(open_log: OpenLog) -> None:
    """Crypto-shredding on each backend (`seal.py`; the cases in unit/test_audit_shred.py)."""
    log = open_log()
    for n, words, subjects in ((1, "alice's text", ("alice",)), (2, "both", ("alice", "bob"))):
        log.record(audit.TextEntry.of(entry(n, detail="upsert"), words, subjects))
    log.record(audit.TextEntry.of(entry(3), "bob's text", ("bob",)))
    assert log.flush() == 3
    assert log.shred("alice") == 1
    assert [row["detail"] for row in all_rows(log)] == [
        f"upsert; {audit.ERASED}",
        f"upsert; {audit.ERASED}",
        "bob's text",
    ]
    assert log.verify().ok
