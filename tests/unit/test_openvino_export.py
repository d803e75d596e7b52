"""The OpenVINO exporter (no optimum-intel) on the architectures it claims, and a refusal.

Each tiny model has random weights built from a config (labelled so in its folder): the
pipeline that serves the exported IR must give transformers' greedy tokens exactly in
fp32. Random weights have tiny logit margins, so this is stricter than a trained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dify_serving.engines import openvino_export

COMMON: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_position_embeddings": 2048,
}


def configs() -> dict[str, Any]:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "qwen2-tied-biases": Qwen2Config(**COMMON, tie_word_embeddings=True),
        "mistral": MistralConfig(**COMMON, sliding_window=None),
        "llama3-rope": LlamaConfig(
            **COMMON,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
    }


def tiny(root: Path, name: str, config: Any) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = root / name
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    (folder / "README.md").write_text("random weights built from a config for a test\n")
    return folder


@pytest.mark.parametrize("name", ["qwen2-tied-biases", "mistral", "llama3-rope"])
def test_the_exported_model_gives_transformers_greedy_tokens(tmp_path: Path, name: str) -> None:
    import openvino
    import openvino_genai
    import torch
    from transformers import AutoModelForCausalLM

    source = tiny(tmp_path, name, configs()[name])
    exported = tmp_path / "ir"
    openvino_export.export(str(source), exported)
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_batched_tokens = 4096
    properties = {"KV_CACHE_PRECISION": "f32", "INFERENCE_PRECISION_HINT": "f32"}
    pipeline = openvino_genai.ContinuousBatchingPipeline(
        str(exported), scheduler, "CPU", properties
    )
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 1000, size=int(n)).tolist()] for n in (7, 23, 38)]
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = 24  # both sides mask eos alike
    handles = [
        pipeline.add_request(i, openvino.Tensor(np.asarray([p], dtype=np.int64)), config)
        for i, p in enumerate(prompts)
    ]  # one shared batch, prompts of different lengths
    while pipeline.has_non_finished_requests():
        pipeline.step()
    got = [list(h.read_all()[0].generated_ids) for h in handles]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = []
    for p in prompts:
        out = model.generate(
            torch.tensor([p]), max_new_tokens=24, do_sample=False, min_new_tokens=24
        )
        expected.append(out[0, len(p) :].tolist())
    assert got == expected


def test_an_architecture_it_cannot_reproduce_is_refused_by_name(tmp_path: Path) -> None:
    from transformers import GPT2Config, MistralConfig

    gpt2 = tiny(tmp_path, "gpt2", GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100))
    with pytest.raises(openvino_export.UnsupportedModel, match="model_type 'gpt2'"):
        openvino_export.export(str(gpt2), tmp_path / "out")
    windowed = tiny(tmp_path, "windowed", MistralConfig(**COMMON, sliding_window=64))
    with pytest.raises(openvino_export.UnsupportedModel, match="sliding-window attention"):
        openvino_export.export(str(windowed), tmp_path / "out2")
