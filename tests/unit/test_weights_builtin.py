"""The built-in random-weight models: one builder, one tokenizer, labelled as random."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dify_serving.engines import weights


def _parameters(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not iterable)


def test_each_builtin_is_a_labelled_random_llama_with_the_demo_tokenizer(tmp_path: Path) -> None:
    demo = Path(weights.resolve("builtin:demo-llm", tmp_path))
    shape = Path(weights.resolve("builtin:demo-llm-58m", tmp_path))
    for folder in (demo, shape):
        assert folder.parent == tmp_path / "models"
        assert (folder / "README.md").read_text() == (
            f"{folder.name}: random weights built by dify-mirror from a config. "
            "It exercises the serving path; its output is gibberish.\n"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (demo / name).read_bytes() == (shape / name).read_bytes()
    config = json.loads((shape / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (512, 8)
    assert _parameters(shape) == 58_526_208  # "58 M" with MiniLM's 30,522-token vocabulary
    assert _parameters(demo) == 10_765_056
    built = (shape / "model.safetensors").stat().st_mtime_ns
    assert weights.resolve("builtin:demo-llm-58m", tmp_path) == str(shape)  # built once
    assert (shape / "model.safetensors").stat().st_mtime_ns == built


def test_an_unknown_builtin_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(weights.WeightsNotFound, match="builtin:demo-llm, builtin:demo-llm-58m"):
        weights.resolve("builtin:demo-llm-1b", tmp_path)
