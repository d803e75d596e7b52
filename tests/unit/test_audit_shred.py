"""Crypto-shredding of audit text (`security/audit/seal.py`): an erased subject's text is
unreadable, everyone else's still reads, the stored rows and the chain stay as they were."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from audit_chain import LOG_KEY, search_entry
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from standins import guarded_app
from support import AUTH

from dify_serving.security.audit import (
    ERASED,
    AuditLog,
    AuditShipper,
    AuditUnavailable,
    TextEntry,
)


def text_entry(n: int, words: str, *subjects: str) -> TextEntry:
    return TextEntry.of(search_entry(n, detail="upsert"), words, subjects)


def stored(path: Path) -> dict[str, Any]:
    """request_id → the stored detail, and the refs of the keys still held, read behind
    the log's back."""
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT request_id, detail FROM audit_log")).all()
            keys = conn.execute(text("SELECT ref FROM audit_text_keys WHERE key != ''")).all()
    finally:
        engine.dispose()
    return {"rows": dict(rows), "keys": [k for (k,) in keys]}


def details(lines: list[str]) -> dict[str, str]:
    rows = [json.loads(line) for line in lines]
    return {row["request_id"]: row["detail"] for row in rows}


def record_four(audit: Any) -> None:
    audit.record(text_entry(1, "alice's secret", "alice"))
    audit.record(text_entry(2, "bob's secret", "bob"))
    audit.record(text_entry(3, "both secrets", "alice", "bob"))
    audit.record(search_entry(4, detail="upsert; nobody's text"))


def test_shred_hides_only_the_subjects_text_and_the_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    audit = AuditLog(f"sqlite:///{path}", key=LOG_KEY)
    record_four(audit)
    assert audit.flush() == 4
    before = stored(path)
    assert len(before["keys"]) == 2  # one per subject, named without the subject
    assert not any("alice" in ref or "bob" in ref for ref in before["keys"])
    assert "alice's secret" not in before["rows"]["req-1"]
    assert before["rows"]["req-1"].startswith("upsert; sealed:v1:")
    assert before["rows"]["req-4"] == "upsert; nobody's text"
    read = details(list(audit.export("jsonl")))
    assert read["req-1"] == "upsert; alice's secret"
    assert read["req-3"] == "upsert; both secrets"

    assert audit.shred("alice") == 1
    assert audit.shred("alice") == 0  # already gone

    after = stored(path)
    assert after["rows"] == before["rows"]  # the rows are untouched
    assert len(after["keys"]) == 1
    read = details(list(audit.export("jsonl")))
    assert read == {
        "req-1": f"upsert; {ERASED}",
        "req-2": "upsert; bob's secret",
        "req-3": f"upsert; {ERASED}",
        "req-4": "upsert; nobody's text",
    }
    page = {row["request_id"]: row["detail"] for row in audit.query(limit=10)[0]}
    assert page == read
    assert "alice" not in "".join(audit.export("csv"))
    report = audit.verify()
    assert report.ok and report.rows_checked == 4, report.summary()

    later = dataclasses.replace(text_entry(5, "alice again", "alice"), time=time.time() + 1)
    audit.record(later)  # a request after the erasure: a new key
    audit.flush()
    read = details(list(audit.export("jsonl")))
    assert read["req-5"] == "upsert; alice again"
    assert read["req-1"] == read["req-3"] == f"upsert; {ERASED}"  # not the new key's
    audit.close()


def test_a_row_recorded_before_an_erasure_and_written_after_it_is_written_erased(
    tmp_path: Path,
) -> None:
    """Two gateway replicas, each with its own writer, on one database: the first still
    holds rows about alice recorded before the second erased her (or before her text was
    ever written). They are written with ERASED in place of the text, never sealed under
    a key made after the erasure; text about her recorded later is sealed and reads."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    first = AuditLog(url, key=LOG_KEY, flush_interval_s=60.0)
    second = AuditLog(url, key=LOG_KEY, flush_interval_s=60.0)
    try:
        first.record(text_entry(1, "alice's secret", "alice"))  # recorded a minute ago
        first.record(text_entry(2, "bob's secret", "bob"))
        assert second.shred("alice") == 0  # no key yet: the erasure's time still counts
        first.flush()
        later = dataclasses.replace(text_entry(3, "alice again", "alice"), time=time.time() + 1)
        first.record(later)
        first.flush()
        rows = stored(tmp_path / "audit.db")["rows"]
        assert "alice's secret" not in rows["req-1"] and rows["req-1"] == f"upsert; {ERASED}"
        read = details(list(second.export("jsonl")))
        assert read == {
            "req-1": f"upsert; {ERASED}",
            "req-2": "upsert; bob's secret",
            "req-3": "upsert; alice again",
        }
        assert second.shred("alice") == 1  # the new key
        assert details(list(first.export("jsonl")))["req-3"] == f"upsert; {ERASED}"
        assert first.verify().ok
    finally:
        first.close()
        second.close()


def test_shred_through_the_shipper_seals_what_was_recorded_before_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    shipper = AuditShipper(f"sqlite:///{path}", key=LOG_KEY)
    try:
        record_four(shipper)  # still buffered here when the shred is asked for
        assert shipper.shred("alice") == 1
        shipper.flush()
        read = details(list(shipper.export("jsonl")))
        assert read["req-1"] == f"upsert; {ERASED}"
        assert read["req-3"] == f"upsert; {ERASED}"
        assert read["req-2"] == "upsert; bob's secret"
        assert "alice's secret" not in "".join(stored(path)["rows"].values())
        assert shipper.verify().ok
    finally:
        shipper.close()


def test_erasing_a_subject_through_the_api_shreds_its_audit_text(tmp_path: Path) -> None:
    app = guarded_app(tmp_path)
    guard = app.state.guard
    guard.config = guard.config.model_copy(update={"record_text": True})
    try:
        with TestClient(app) as client:
            for doc_id, words, subject in (
                ("a1", "Alice lives on Elm St", "alice"),
                ("b1", "Bob rides", "bob"),
            ):
                docs = [{"id": doc_id, "text": words, "subject_id": subject}]
                r = client.post(
                    "/v1/data/upsert", json={"index": "kb", "documents": docs}, headers=AUTH
                )
                assert r.status_code == 200, r.text
            paths = client.get("/openapi.json").json()["paths"]
            named = [p["name"] for p in paths["/v1/data/upsert"]["post"]["parameters"]]
            assert "X-Dify-Subject" in named
            about = {**AUTH, "X-Dify-Subject": "alice"}
            r = client.post(
                "/v1/data/search", json={"index": "kb", "query": "where is Alice"}, headers=about
            )
            assert r.status_code == 200, r.text
            r = client.post(
                "/v1/data/search",
                json={"index": "kb", "query": "x"},
                headers={**AUTH, "X-Dify-Subject": "no spaces"},
            )
            assert r.status_code == 422 and "X-Dify-Subject" in r.json()["error"]["message"]
            before = client.get("/v1/audit/export", headers=AUTH).text
            assert "Alice lives on Elm St" in before and "where is Alice" in before

            r = client.post("/v1/data/delete", json={"subject_id": "alice"}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["audit_text_shredded"] == 1

            after = client.get("/v1/audit/export", headers=AUTH).text
            assert "Alice" not in after and "Bob rides" in after
            rows = [json.loads(line) for line in after.splitlines()]
            erased = [row for row in rows if ERASED in (row["detail"] or "")]
            assert len(erased) == 2  # the upsert and the search about alice
            erasure = next(row for row in rows if row["route"] == "/v1/data/delete")
            assert "audit text keys destroyed=1" in erasure["detail"]
            assert guard.audit.verify().ok
    finally:
        guard.close()


def test_no_key_is_destroyed_while_rows_queued_before_it_cannot_be_written(
    tmp_path: Path,
) -> None:
    """An outage: the shred refuses (the erasure answers 503 and is retried) rather than
    let a row recorded before it be sealed later under a new key."""
    path = tmp_path / "audit.db"
    audit = AuditLog(f"sqlite:///{path}", key=LOG_KEY, flush_interval_s=60.0)
    audit.record(text_entry(1, "alice's secret", "alice"))
    audit.flush()
    writes = audit._writer._write
    audit._writer._write = lambda rows: (_ for _ in ()).throw(OSError("database down"))
    audit.record(text_entry(2, "more of alice", "alice"))
    with pytest.raises(AuditUnavailable):
        audit.shred("alice")
    assert len(stored(path)["keys"]) == 1  # not destroyed
    audit._writer._write = writes
    assert audit.shred("alice") == 1
    assert set(details(list(audit.export("jsonl"))).values()) == {f"upsert; {ERASED}"}
    audit.close()


def test_a_key_table_from_before_erasure_times_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE audit_text_keys (ref VARCHAR(64) PRIMARY KEY, "
                "key VARCHAR(64) NOT NULL, created FLOAT NOT NULL)"
            )
        )
    engine.dispose()
    audit = AuditLog(f"sqlite:///{path}", key=LOG_KEY)
    try:
        record_four(audit)
        audit.flush()
        assert audit.shred("alice") == 1
        assert details(list(audit.export("jsonl")))["req-1"] == f"upsert; {ERASED}"
    finally:
        audit.close()
