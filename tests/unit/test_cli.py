"""`dify-mirror serve` refusing a bad manifest before anything starts.

`serve` and `apply` against a running stack are in `tests/stack/test_cli.py`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from support import model_doc

CLI = [sys.executable, "-m", "dify_serving.cli"]


def test_bad_manifest_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(model_doc("x", "m", "text-generation", precision="fp99")))
    out = subprocess.run([*CLI, "serve", "-f", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "DifyModel x" in out.stderr and "precision" in out.stderr
    assert "Traceback" not in out.stderr
