"""Checkpoints of the audit chain's head outside the database: the file, an unreachable
Redis, the CLI's verify, and when a ConfigMap is used. The CLI runs in-process.

Redis itself: `tests/services/test_audit_checkpoint.py`; the ConfigMap in the Kubernetes
emulator: `tests/operator/test_audit_checkpoint.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from audit_chain import KEY, from_file, run_sql, write

from dify_serving.cli import main
from dify_serving.security import audit
from dify_serving.security.audit import AuditLog, Checkpoint, CheckpointPlaces
from dify_serving.security.audit.checkpoint import (
    CONFIGMAP,
    FILE_NAME,
    ConfigMapCheckpoint,
)
from dify_serving.settings import Settings


@pytest.mark.parametrize("content", ["not json", '{"version": "audit.v2", "seq": -1}'])
def test_an_unreadable_checkpoint_fails_verify(tmp_path: Path, content: str) -> None:
    file = tmp_path / FILE_NAME
    places = CheckpointPlaces(file=str(file))
    database = f"sqlite:///{tmp_path / 'audit.db'}"
    log = AuditLog(database, key=KEY, checkpoints=places, checkpoint_s=None)
    try:
        write(log, 2)
        file.write_text(content)
        log.checkpoint()  # what it cannot judge, the writer leaves alone
        assert file.read_text() == content
        report = log.verify()
    finally:
        log.close()
    assert not report.ok and report.first_bad_seq is None
    assert report.reason is not None and report.reason.startswith(audit.CHECKPOINT_UNREADABLE)
    assert report.summary().startswith("audit chain NOT VERIFIED: checkpoint unreadable")


def test_an_unreachable_redis_fails_verify_and_never_stops_the_writer(tmp_path: Path) -> None:
    places = CheckpointPlaces(
        file=str(tmp_path / FILE_NAME),
        redis_url="redis://dm:hunter2@127.0.0.1:1/0",
        redis_prefix="x:",
    )
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", key=KEY, checkpoints=places)
    try:
        write(log, 3)
        log.checkpoint()
        assert (from_file(tmp_path / FILE_NAME) or Checkpoint(0, "", 0, "")).seq == 3
        report = log.verify()
    finally:
        log.close()
    assert not report.ok and report.reason is not None
    assert report.reason.startswith(f"{audit.CHECKPOINT_UNREADABLE}: redis x:")
    assert "hunter2" not in report.reason


def test_cli_verify_prints_the_head_and_json_for_scripts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    log = AuditLog.from_settings_like(None, home)
    write(log, 4)
    log.close()  # a writer checkpoints once more when it closes
    before = (home / FILE_NAME).read_text()

    monkeypatch.setenv("DIFY_MIRROR_HOME", str(home))
    for name in ("DATABASE_URL", "REDIS_URL", "AUDIT_CONFIGMAP"):
        monkeypatch.delenv(f"DIFY_MIRROR_{name}", raising=False)
    assert main(["audit", "verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "audit chain ok: 4 rows"
    assert lines[1].startswith("head:       seq 4 hash ") and len(lines[1].split()[-1]) == 64
    assert lines[2].startswith("checkpoint: seq 4 hash ")

    assert main(["audit", "verify", "--json"]) == 0
    good = json.loads(capsys.readouterr().out)
    assert (good["ok"], good["rows_checked"], good["first_bad_seq"], good["reason"]) == (
        True,
        4,
        None,
        None,
    )
    assert good["head"]["seq"] == 4 and good["checkpoint"]["seq"] == 4
    assert good["head"]["hash"] == good["checkpoint"]["hash"]
    assert isinstance(good["checkpoint"]["time"], float)
    assert (home / FILE_NAME).read_text() == before  # verify only reads

    run_sql(home / "audit.db", "DELETE FROM audit_log WHERE seq > 2")
    assert main(["audit", "verify", "--json"]) == 1
    bad = json.loads(capsys.readouterr().out)
    assert (bad["ok"], bad["rows_checked"], bad["first_bad_seq"], bad["reason"]) == (
        False,
        2,
        3,
        audit.TAIL_MISSING,
    )
    assert bad["head"]["seq"] == 2 and bad["checkpoint"]["seq"] == 4


# ---- the ConfigMap: which names, and when it is used ----------------------------------


def test_configmap_names_that_would_change_the_url_are_refused() -> None:
    for namespace, name in (("default", "../secrets"), ("kube-system/x", CONFIGMAP)):
        with pytest.raises(ValueError, match="DNS label"):
            ConfigMapCheckpoint("http://127.0.0.1:1", namespace, name)


def test_the_configmap_is_used_only_when_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert CheckpointPlaces.detect(tmp_path).configmap is None
    monkeypatch.setenv("DIFY_MIRROR_AUDIT_CONFIGMAP", CONFIGMAP)
    assert Settings(home=tmp_path).security_options().audit_configmap == CONFIGMAP
    monkeypatch.setenv("DIFY_MIRROR_NAMESPACE", "serving")
    places = CheckpointPlaces.detect(tmp_path, "redis://secret@host", CONFIGMAP)
    assert (places.configmap, places.kube_api, places.namespace) == (
        CONFIGMAP,
        "https://10.0.0.1:443",
        "serving",
    )
    assert "secret" not in repr(places)
