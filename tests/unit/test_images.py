"""The images, skaffold and `make e2e`, checked without Docker (none runs here).

- Each Dockerfile is multi-stage, pins its base by digest and runs as a numeric non-root
  user; the Docker context (`.dockerignore`) holds what the Dockerfiles copy, no more.
- The operator image installs `.[operator]`: its whole dependency closure, resolved from
  the installed distributions' metadata, has no torch, transformers, Ray or CUDA.
- The serving image takes torch from PyTorch's CPU index unless VARIANT=cuda.
- skaffold.yaml is valid against Skaffold's published schema (v4beta13, kept as test
  data) and names files that exist; the chart's names it uses are checked in
  test_chart.py, where the chart is rendered.
- `make e2e` without Docker stops at once with one line naming what is missing.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "operator": ROOT / "operator" / "Dockerfile",
    "serving": ROOT / "serving" / "Dockerfile",
}
#: What the operator image must never pull in (the serving image's weight).
HEAVY = ("torch", "transformers", "ray", "vllm", "triton", "openvino", "ctranslate2")
DIGEST = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(path: Path) -> dict[str, str]:
    """Each ARG's default (the first one wins, as in the global scope)."""
    found: dict[str, str] = {}
    for word, rest in _instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            found.setdefault(name, default)
    return found


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_each_image_is_multi_stage_pinned_and_non_root(image: str) -> None:
    path = DOCKERFILES[image]
    steps = _instructions(path)
    defaults = _args(path)
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert len(bases) >= 2, "a build stage and a runtime stage"
    for base in bases:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], base)
        assert DIGEST.match(resolved), f"{image}: base {resolved!r} is not pinned by digest"
    final = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    users = [rest for word, rest in steps[final:] if word == "USER"]
    assert users, f"{image}: the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{image}: USER {users[-1]} (numeric, non-root)"


def test_the_docker_context_holds_what_the_dockerfiles_copy() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "the context is an allow-list"
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    for path in DOCKERFILES.values():
        for word, rest in _instructions(path):
            if word != "COPY" or rest.startswith("--from"):
                continue
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path"
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"{path.relative_to(ROOT)}: COPY {source}, which .dockerignore leaves out"
                )
    assert not [a for a in allowed if not (ROOT / a).exists()]


def _installed_extras(path: Path) -> set[str]:
    """The extras of the `pip install '.[...]'` that installs the project."""
    for word, rest in _instructions(path):
        found = re.search(r"pip install [^&;]*?['\"]?\.\[([\w,${}]+)\]", rest)
        if word == "RUN" and found:
            return set(found.group(1).split(","))
    raise AssertionError(f"{path}: no pip install of the project")


@cache
def _requires(name: str) -> tuple[Requirement, ...]:
    try:
        return tuple(Requirement(r) for r in metadata.requires(name) or ())
    except metadata.PackageNotFoundError:
        raise AssertionError(f"{name} is not installed: make install") from None


def _closure(root: str, extras: set[str]) -> dict[str, str]:
    """Every distribution `pip install root[extras]` brings, with who asked for it."""
    wanted: dict[str, str] = {}
    todo = [(root, frozenset(extras) or frozenset({""}), "")]
    seen = set()
    while todo:
        name, asked, by = todo.pop()
        key = (canonicalize_name(name), asked)
        if key in seen:
            continue
        seen.add(key)
        wanted.setdefault(key[0], by)
        for req in _requires(name):
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in asked):
                extra = frozenset(req.extras) or frozenset({""})
                todo.append((req.name, extra, name))
    return wanted


def test_the_operator_image_installs_no_torch() -> None:
    extras = _installed_extras(DOCKERFILES["operator"])
    assert extras == {"operator"}
    closure = _closure("dify-mirror", extras)
    assert "kopf" in closure and "kubernetes" in closure
    heavy = {
        name: by for name, by in closure.items() if name in HEAVY or name.startswith("nvidia-")
    }
    assert not heavy, f"the operator image would install {heavy} (name: asked by)"


def test_the_serving_image_takes_torch_from_the_cpu_index_unless_cuda() -> None:
    run = " ".join(rest for word, rest in _instructions(DOCKERFILES["serving"]) if word == "RUN")
    cpu = re.search(r"cpu\)\s*pip install [^;]*", run)
    cuda = re.search(r"cuda\)\s*pip install [^;]*", run)
    assert cpu and "--index-url https://download.pytorch.org/whl/cpu" in cpu.group(0)
    assert cuda and "--index-url" not in cuda.group(0)
    assert _args(DOCKERFILES["serving"])["VARIANT"] == "cpu"
    assert "serving,vllm" in run  # the CUDA variant brings spec.engine vllm


def test_skaffold_config_is_valid_and_names_real_files() -> None:
    with gzip.open(Path(__file__).parent / "chart_schemas" / "skaffold.v4beta13.json.gz") as f:
        schema = json.load(f)
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    assert config["apiVersion"] == "skaffold/v4beta13"
    jsonschema.Draft7Validator(schema).validate(config)
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict: typos fail
        jsonschema.Draft7Validator(schema).validate(config | {"portForwards": []})
    images = {a["image"]: a for a in config["build"]["artifacts"]}
    assert set(images) == {"dify-mirror-operator", "dify-mirror-serving"}
    for artifact in images.values():
        assert (ROOT / artifact["context"] / artifact["docker"]["dockerfile"]).is_file()
    (release,) = config["deploy"]["helm"]["releases"]
    assert (ROOT / release["chartPath"] / "Chart.yaml").is_file()
    for values in release["valuesFiles"]:
        assert (ROOT / values).is_file()
    templates = " ".join(release["setValueTemplates"].values())
    for image in images:  # each built image reaches the chart
        assert f"IMAGE_REPO_{image.replace('-', '_')}" in templates
        assert f"IMAGE_TAG_{image.replace('-', '_')}" in templates


def test_make_e2e_without_docker_stops_at_once_naming_what_is_missing(tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # bash and coreutils only: no docker, kind, kubectl or helm
    bare.mkdir()
    for tool in ("bash", "dirname", "env"):
        (bare / tool).symlink_to(subprocess.run(
            ["bash", "-c", f"command -v {tool}"], capture_output=True, text=True, check=True
        ).stdout.strip())  # fmt: skip
    done = subprocess.run(
        ["bash", str(ROOT / "e2e" / "kind.sh")],
        env={"PATH": str(bare), "HOME": str(tmp_path)} | {"LANG": os.environ.get("LANG", "C")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("make e2e: missing docker kind kubectl helm")
    assert done.stdout == ""
