"""What a user could run in-process instead of this stack: the anchors of `make bench`.

Each anchor loads and warms once, then `run` times one batch of work the same shape as
the HTTP figure beside it. Two kinds: the library our own engine wraps (transformers'
continuous batching, sentence-transformers), which shows the gateway's own cost, and
what a user would pick instead (transformers `generate`, fastembed), which shows whether
the stack is worth its keep.
"""

from __future__ import annotations

import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

#: fastembed's name for the MiniLM exported here (a custom model: nothing downloaded).
FASTEMBED_MODEL = "dify-bench/all-MiniLM-L6-v2-onnx"
#: Lowest cosine between fastembed's vectors and sentence-transformers' before timing.
SAME_VECTORS = 0.9999


def generate_sequential(path: str, prompts: list[str], max_new: int) -> float:
    """tokens/s of transformers `generate`, one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        warm = tok("warm up", return_tensors="pt")["input_ids"]
        model.generate(input_ids=warm, max_new_tokens=4, do_sample=False)
        tokens, t0 = 0, time.perf_counter()
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            out = model.generate(
                input_ids=ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
            )
            tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - t0)


class FirstTokenAnchor:
    """transformers `generate` in fp32, one request at a time: how long the first token
    takes (tokenize, prefill, pick one token), the median over the prompts of a run."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.run(["warm up", "warm up again"])

    def run(self, prompts: list[str]) -> float:
        times = []
        with self.torch.inference_mode():
            for p in prompts:
                t0 = time.perf_counter()
                ids = self.tok(p, return_tensors="pt")["input_ids"]
                self.model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


class ManagerAnchor:
    """The library's own ceiling: one warmed, persistent manager, no HTTP, no asyncio.

    It never stops at an end-of-sequence token (every request makes `max_new` tokens);
    `texts` cuts each output where the served model would have stopped, so the HTTP
    answers can be compared with it.
    """

    def __init__(self, path: str, max_new: int, num_blocks: int = 1024) -> None:
        from transformers import (
            AutoModelForCausalLM,
            AutoTokenizer,
            ContinuousBatchingConfig,
            GenerationConfig,
        )

        self.max_new = max_new
        self.tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.manager = model.init_continuous_batching(
            generation_config=GenerationConfig(
                do_sample=False, max_new_tokens=max_new, eos_token_id=-1, pad_token_id=0
            ),
            continuous_batching_config=ContinuousBatchingConfig(
                num_blocks=num_blocks,
                page_size=64,
                max_batch_tokens=1024,
                auto_switch_to_flash=False,
            ),
        )
        self.manager.warmup()
        self.manager.start()
        #: The tokens of the last run, by request index.
        self.outputs: dict[int, list[int]] = {}
        self.run(["warm up"] * 4, 4)

    def run(self, prompts: list[str], concurrency: int) -> float:
        pending = iter(enumerate(prompts))
        in_flight, tokens = 0, 0
        t0 = time.perf_counter()
        self.outputs = {}

        def submit() -> bool:
            nonlocal in_flight
            item = next(pending, None)
            if item is None:
                return False
            i, p = item
            self.manager.add_request(
                self.tok(p)["input_ids"], request_id=f"{t0}-{i}", max_new_tokens=self.max_new
            )
            in_flight += 1
            return True

        while in_flight < concurrency and submit():
            pass
        while in_flight:
            out = self.manager.get_result(timeout=60)
            if out is None or not out.is_finished():
                continue
            tokens += len(out.generated_tokens)
            self.outputs[int(out.request_id.rsplit("-", 1)[1])] = list(out.generated_tokens)
            in_flight -= 1
            submit()
        return tokens / (time.perf_counter() - t0)

    def texts(self) -> list[str]:
        """The last run's outputs as the served model returns them: up to and including
        the first end-of-sequence token, decoded without special tokens."""
        out = []
        for i in range(len(self.outputs)):
            tokens = self.outputs[i]
            stop = next((k for k, t in enumerate(tokens) if t in self.eos), len(tokens) - 1)
            out.append(str(self.tok.decode(tokens[: stop + 1], skip_special_tokens=True)))
        return out

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=10)


class EncodeAnchor:
    """sentence-transformers `encode(batch_size=32)` in-process, loaded and warmed once."""

    def __init__(self, path: str, warm: list[str]) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.model.encode(warm, batch_size=32)

    def run(self, texts: list[str]) -> float:
        t0 = time.perf_counter()
        self.model.encode(texts, batch_size=32)
        return len(texts) / (time.perf_counter() - t0)

    def vectors(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=32, normalize_embeddings=True))


class EngineEmbedAnchor:
    """Our own embedding engine in-process, as a replica runs it (the same spec: engine,
    precision, batching, threads), with no gateway, Serve handle or HTTP in front: the
    anchor that shows the gateway's own cost per request."""

    def __init__(self, name: str, spec: Any, path: str, home: Path) -> None:
        import asyncio

        from dify_serving.engines.embeddings import EmbeddingEngine

        self.engine = EmbeddingEngine(name, spec, path, home=home)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())

    def run(self, texts: list[str], concurrency: int, per_call: int = 1) -> float:
        """sentences/s of `texts`, `per_call` texts a call, `concurrency` calls at once."""
        import asyncio

        calls = [texts[i : i + per_call] for i in range(0, len(texts), per_call)]
        pending = iter(calls)

        async def worker() -> None:
            for chunk in pending:
                await self.engine.embed(chunk)

        async def all_calls() -> None:
            await asyncio.gather(*(worker() for _ in range(concurrency)))

        t0 = time.perf_counter()
        self.loop.run_until_complete(all_calls())
        return len(texts) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.loop.close()


class FastembedAnchor:
    """fastembed (ONNX Runtime) on the same MiniLM weights, exported here to ONNX.

    fastembed's own MiniLM would be a hub download; this one is the packaged weights run
    through `torch.onnx.export`, registered as a custom model (mean pooling, normalized,
    as the sentence-transformers pipeline of MiniLM does) and loaded from the folder.
    """

    def __init__(self, path: str, folder: Path, threads: int, warm: list[str]) -> None:
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType

        export_onnx(Path(path), folder)
        known = {m["model"] for m in TextEmbedding.list_supported_models()}
        if FASTEMBED_MODEL not in known:
            TextEmbedding.add_custom_model(
                FASTEMBED_MODEL,
                pooling=PoolingType.MEAN,
                normalization=True,
                sources=ModelSource(hf=FASTEMBED_MODEL),
                dim=384,
                model_file="onnx/model.onnx",
            )
        self.model = TextEmbedding(
            FASTEMBED_MODEL, specific_model_path=str(folder), threads=threads
        )
        self.run(warm)

    def run(self, texts: list[str]) -> float:
        t0 = time.perf_counter()
        for _ in self.model.embed(texts, batch_size=32):
            pass
        return len(texts) / (time.perf_counter() - t0)

    def vectors(self, texts: list[str]) -> np.ndarray:
        return np.stack(list(self.model.embed(texts, batch_size=32)))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest cosine similarity between matching rows of `a` and `b`."""
    dots = (a * b).sum(axis=1)
    return float((dots / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def export_onnx(path: Path, folder: Path) -> None:
    """A BERT encoder's weights → `folder/onnx/model.onnx` (last hidden state, dynamic
    batch and length) beside the tokenizer files fastembed reads."""
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):  # positional inputs, one named output
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    (folder / "onnx").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / name, folder / name)
    if (path / "special_tokens_map.json").is_file():
        shutil.copy(path / "special_tokens_map.json", folder / "special_tokens_map.json")
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        torch.onnx.export(
            Encoder(model),
            (ids, ids, torch.zeros_like(ids)),
            str(folder / "onnx" / "model.onnx"),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
