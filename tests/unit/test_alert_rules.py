"""The alert rules under `promtool` (Debian's `prometheus` package; `.ci/run` installs it):
they parse, and they fire (and stay quiet) as `alerts_test.yaml` says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import require_service

RULES = Path(__file__).resolve().parents[2] / "observability" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool")

    def probe() -> None:
        if found is None:
            raise FileNotFoundError("promtool is not on PATH (apt-get install prometheus)")

    require_service("promtool", probe)
    assert found is not None
    return found


@pytest.mark.parametrize(
    "command", [["check", "rules", "alerts.yaml"], ["test", "rules", "alerts_test.yaml"]]
)
def test_alert_rules_pass_promtool(command: list[str]) -> None:
    done = subprocess.run(
        [promtool(), *command], cwd=RULES, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_documented_scrape_config_parses(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text((RULES / "scrape.yaml").read_text())
    (tmp_path / "alerts.yaml").write_text((RULES / "alerts.yaml").read_text())
    (tmp_path / "dify-metrics-key").write_text("dm_x")
    text = config.read_text().replace(
        "/etc/prometheus/dify-metrics-key", str(tmp_path / "dify-metrics-key")
    )
    config.write_text(text)
    done = subprocess.run(
        [promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
