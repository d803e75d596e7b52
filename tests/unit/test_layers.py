"""The layers hold: import-linter's contracts (pyproject.toml) pass, and the modules they
declare light import nothing heavy when actually imported.

The contracts are the one list: the layer order, the forbidden heavy imports and the
no-circles rule all live in `[tool.importlinter]`, so a new light module is declared there
once and both `make lint` and this test hold it to that.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
    "contracts"
]
LIGHT = next(c for c in CONTRACTS if "dify_operator" in c.get("source_modules", ()))


def test_the_import_contracts_hold_and_cover_circles() -> None:
    assert any(
        c["type"] == "acyclic_siblings" and set(c["ancestors"]) == {"dify_serving", "dify_operator"}
        for c in CONTRACTS
    )
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None
    out = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


@pytest.mark.parametrize("module", LIGHT["source_modules"])
def test_light_modules_import_nothing_heavy(module: str) -> None:
    heavy = LIGHT["forbidden_modules"]
    code = (
        f"import sys, {module}; print(','.join(sorted(m for m in {heavy!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_a_circle_breaks_the_contract(tmp_path: Path) -> None:
    """What `acyclic_siblings` does with a circle between two sibling modules."""
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circle import b\n")
    (package / "b.py").write_text("from circle import a\n")
    config = tmp_path / ".importlinter"
    config.write_text(
        "[importlinter]\nroot_package = circle\n\n"
        "[importlinter:contract:acyclic]\nname = no circles\ntype = acyclic_siblings\n"
        "ancestors = circle\n"
    )
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None
    out = subprocess.run(
        [lint, "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-2000:]
