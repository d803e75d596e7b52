"""The audit trail without a database server: an unreachable one, and SQLite under home
as the gateway's writer and the CLI share it.

The trail against both stores, SQLite and PostgreSQL, is `tests/services/test_audit.py`.
"""

from __future__ import annotations

import time
from pathlib import Path

from audit_chain import LOG_KEY as KEY
from audit_chain import search_entry as entry

from dify_serving.security import audit
from dify_serving.security.audit import (
    AuditLog,
    AuditShipper,
    CheckpointPlaces,
)
from dify_serving.security.db import database_url

UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"


def test_unreachable_database_queues_and_closes_promptly() -> None:
    log = AuditLog(UNREACHABLE_PG, key=KEY, flush_interval_s=0.05, max_queue=5)
    for n in range(8):
        log.record(entry(n))
    assert log.flush() == 0
    assert log.pending == 5 and log.dropped == 3
    started = time.monotonic()
    log.close(timeout_s=1.0)
    assert time.monotonic() - started < 3.0
    log.record(entry(9))
    assert log.dropped == 4


def test_settings_default_to_sqlite_under_home(tmp_path: Path) -> None:
    log = AuditLog.from_settings_like(None, tmp_path / "home")
    log.record(entry())
    assert log.flush() == 1
    log.close()
    assert (tmp_path / "home" / "audit.db").is_file()


def test_the_gateways_writer_and_the_cli_share_one_chain_key_and_checkpoints(
    tmp_path: Path,
) -> None:
    """Rows shipped by a gateway verify from the CLI's log of the same home, checkpoint too."""
    home = tmp_path / "home"
    shipper = AuditShipper.for_home(database_url(home, None, "audit"), home)
    try:
        for n in range(3):
            shipper.record(entry(n))
        assert shipper.flush() == 3
    finally:
        shipper.close()
    assert audit.home_chain(home)[1] == CheckpointPlaces.detect(home)
    cli = AuditLog.from_settings_like(None, home)
    try:
        report = cli.verify()
    finally:
        cli.close()
    assert report.ok, report.summary()
    assert report.head.seq == 3 and report.checkpoint is not None and report.checkpoint.seq == 3
