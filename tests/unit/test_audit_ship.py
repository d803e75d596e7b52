"""The gateway's audit writer process: rows arrive, across loops and threads, and on exit;
the process also keeps the chain's head checkpointed outside the database."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from support import wait_for

from dify_serving.security.audit import AuditEntry, AuditLog, AuditShipper, CheckpointPlaces

KEY = b"ship-test-audit-key-0123456789ab"


def entry(route: str) -> AuditEntry:
    return AuditEntry(
        time=time.time(),
        request_id=route.strip("/").replace("/", "-"),
        key_id=None,
        client_ip="127.0.0.1",
        method="GET",
        route=route,
        status=200,
        latency_ms=0.5,
    )


def test_rows_from_loops_threads_and_plain_calls_all_arrive(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    shipper = AuditShipper(url, key=KEY)

    async def in_loop(route: str) -> None:
        shipper.record(entry(route))

    asyncio.run(in_loop("/one"))  # its timer dies with its loop
    asyncio.run(in_loop("/two"))
    thread = threading.Thread(target=lambda: shipper.record(entry("/three")))
    thread.start()
    thread.join()
    shipper.record(entry("/four"))
    shipper.flush()
    routes = [r["route"] for r in shipper.query(limit=10)[0]]
    assert sorted(routes) == ["/four", "/one", "/three", "/two"]
    shipper.record(entry("/last"))  # still buffered: close must deliver it
    shipper.close()
    audit = AuditLog(url, key=KEY)
    try:
        assert [r["route"] for r in audit.query(limit=10)[0]][-1] == "/last"
        assert audit.verify().ok
    finally:
        audit.close()


def test_a_dead_writer_is_restarted(tmp_path: Path) -> None:
    shipper = AuditShipper(f"sqlite:///{tmp_path / 'audit.db'}", key=KEY)
    try:
        assert shipper._proc is not None
        shipper._proc.kill()
        shipper._proc.wait(5)
        shipper.record(entry("/after"))
        shipper.flush()
        assert [r["route"] for r in shipper.query(limit=10)[0]] == ["/after"]
    finally:
        shipper.close()


def test_the_writer_process_checkpoints_the_head_and_verify_uses_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    place = tmp_path / "audit-checkpoint.json"
    shipper = AuditShipper(
        url, key=KEY, checkpoints=CheckpointPlaces(file=str(place)), checkpoint_s=0.2
    )

    def checkpoint_seq() -> int | None:
        try:
            return int(json.loads(place.read_text())["seq"])
        except (OSError, ValueError):
            return None

    try:
        for n in range(5):
            shipper.record(entry(f"/r{n}"))
        shipper.flush()
        assert wait_for(lambda: checkpoint_seq() == 5), checkpoint_seq()
        report = shipper.verify()  # the gateway's reader compares with the same file
        assert report.ok and report.checkpoint is not None and report.checkpoint.seq == 5
    finally:
        shipper.close()
    assert oct(place.stat().st_mode & 0o777) == "0o600"
