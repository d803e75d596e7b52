"""The operator and the specs stay light: importing them loads no torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "dify_operator",
        "dify_serving.specs",
        "dify_serving.render",
        "dify_serving.control",
        "dify_serving.crdgen",
        "dify_serving.status",
    ],
)
def test_light_modules_import_nothing_heavy(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'dify_serving.engines') "
        "if m in sys.modules); print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
