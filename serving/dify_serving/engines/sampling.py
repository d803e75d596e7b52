"""Per-request sampling inside transformers' continuous batching.

The stock continuous-batching processors can vary temperature/top_p per request but not
the seed (sampling draws from the process-wide RNG). So the manager runs greedy and this
processor samples each row itself, with Gumbel-max over a generator seeded by
(seed, step): a request's tokens do not depend on which others share its batch. It then
masks every logit but the chosen one, and the manager's argmax picks it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)

#: top-k/top-p are computed inside the best CANDIDATES logits (topk is far cheaper than
#: a full sort); exact for top_k ≤ CANDIDATES, and a trained model's nucleus is smaller.
CANDIDATES = 1024


class PerRequestSampler(ContinuousBatchingLogitsProcessor):
    supported_kwargs = {"temperature": float, "top_p": float, "top_k": int, "seed": int}
    ignored_kwargs = ()

    def __init__(self) -> None:
        self._rows: list[tuple[float, float, int, int, int]] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: Any) -> torch.Tensor:
        """Runs on the batching thread right before the forward of the same batch."""
        rows = []
        for fs in requests_with_new_token:
            kw = fs.state.logit_processor_kwargs
            rows.append(
                (
                    kw.get("temperature", 0.0),
                    kw.get("top_p", 1.0),
                    kw.get("top_k", 0),
                    kw.get("seed", 0),
                    fs.state.generated_len(),
                )
            )
        self._rows = rows
        return torch.arange(len(rows), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = self._rows[: scores.size(0)]
        sampled = [i for i, r in enumerate(rows) if r[0] > 0.0]
        if not sampled:
            return scores  # all greedy: the manager takes the argmax
        idx = torch.tensor(sampled)
        temp = torch.tensor([rows[i][0] for i in sampled], dtype=torch.float32)
        top_p = torch.tensor([rows[i][1] for i in sampled], dtype=torch.float32)
        top_k = torch.tensor([rows[i][2] for i in sampled], dtype=torch.int64)
        logits = scores[idx].float() / temp[:, None]
        filtered = bool(((top_p < 1.0) | (top_k > 0)).any())
        vocab_map = None
        if filtered:
            cand_logits, vocab_map = torch.topk(logits, min(CANDIDATES, logits.size(-1)), dim=-1)
            probs = (cand_logits - torch.logsumexp(logits, -1, keepdim=True)).exp()
            mass_before = probs.cumsum(-1) - probs
            rank = torch.arange(cand_logits.size(-1))[None, :]
            remove = (mass_before >= top_p[:, None]) | (
                (top_k[:, None] > 0) & (rank >= top_k[:, None])
            )
            remove[:, 0] = False  # always keep the best token
            logits = cand_logits.masked_fill(remove, float("-inf"))
        noise = torch.empty_like(logits)
        for j, i in enumerate(sampled):
            seed, step = rows[i][3], rows[i][4]
            generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
            noise[j].uniform_(1e-10, 1.0, generator=generator)
        choice = torch.argmax(logits - torch.log(-torch.log(noise)), dim=-1)
        if vocab_map is not None:
            choice = vocab_map.gather(1, choice[:, None]).squeeze(1)
        scores[idx] = float("-inf")
        scores[idx, choice] = 0.0
        return scores


def install(manager: Any, processor: ContinuousBatchingLogitsProcessor) -> None:
    """Append a processor to a manager; before `warmup()`/`start()` (tensors are sized then)."""
    chain = manager.logit_processor
    chain.logits_processor.append(processor)
    chain.tensors_required += 1
    chain.supported_keys.update(processor.supported_kwargs)
    chain.ignored_keys.update(processor.ignored_kwargs)
    chain.do_processing = True
