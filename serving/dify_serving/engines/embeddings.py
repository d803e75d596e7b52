"""Sentence embeddings: mean-pooled, L2-normalised, dynamically batched.

Requests are tokenized once on arrival (that is where over-long inputs are refused),
then the token rows go to `submit`: in a Serve replica, `ModelServer` routes each row
through a `@serve.batch` queue; outside Serve (benchmarks, tests) a call is one batch.
A batch is padded to its longest member and runs on a dedicated compute thread, so the
event loop keeps forming the next batch while torch works. Matches
sentence-transformers' `encode` for mean-pooling models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dify_serving.engines.base import Engine, InputTooLong
from dify_serving.specs import DifyModelSpec, Task


class EmbeddingEngine(Engine):
    task = Task.FEATURE_EXTRACTION

    def __init__(self, name: str, spec: DifyModelSpec, path: str) -> None:
        super().__init__(name, spec, path)
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision)
        self.model = AutoModel.from_pretrained(path, revision=spec.revision, dtype=self.dtype)
        self.model.to(self.device).eval()
        positions = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_tokens = int(min(self.tokenizer.model_max_length, positions))
        self.dimension = int(self.model.config.hidden_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{name}")
        self.submit: Callable[[list[list[int]]], Awaitable[list[np.ndarray]]] = self.forward

    async def start(self) -> None:
        await self.embed(["warm up the kernels"] * 2)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "dimension": self.dimension, "max_tokens": self.max_tokens}

    def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        ids: list[list[int]] = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for position, row in enumerate(ids):
            if len(row) > self.max_tokens:
                if not truncate:
                    raise InputTooLong(
                        f"input {position} has {len(row)} tokens; {self.name} accepts at "
                        f"most {self.max_tokens}. Send truncate: true, or upsert the text "
                        "into an index, which chunks it."
                    )
                ids[position] = row[: self.max_tokens - 1] + row[-1:]
        return ids

    async def embed(self, texts: list[str], truncate: bool = False) -> dict[str, Any]:
        ids = self.tokenize(texts, truncate)
        vectors = await self.submit(ids)
        return {
            "vectors": np.stack(vectors) if vectors else np.zeros((0, self.dimension)),
            "prompt_tokens": sum(len(row) for row in ids),
        }

    async def forward(self, rows: list[list[int]]) -> list[np.ndarray]:
        """One padded batch on the compute thread."""
        loop = asyncio.get_running_loop()
        matrix = await loop.run_in_executor(self._pool, self._forward, rows)
        return list(matrix)

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        torch = self._torch
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state
            weights = mask.to(out.device).unsqueeze(-1).to(out.dtype)
            pooled = (out * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32)
