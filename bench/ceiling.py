"""The most this CPU's matrix units allow an encoder: a ceiling beside the embedding rows.

An encoder's time goes to its matmuls. Their FLOPs per sentence (counted by torch's
`FlopCounterMode` on the anchor's own batches: sorted by length, 32 at a time, padded)
and the best rate of one matmul of the model's largest shape (the feed-forward's) on this
CPU (torch's and OpenVINO's kernels on `THREADS` threads, the better of the two) give
the sentences per second that no engine passes in that precision: an upper bound, as if
every FLOP ran at that matmul's rate and nothing else took time. Set beside the anchor,
it says whether a target is within this CPU's reach at all: where torch already runs
near the fp32 peak, no fp32 engine can double it, and the row says so in the run that
measured it. The peak is sampled in every interleaved round right after the anchor (this
host's speed drifts by a fifth between minutes), and each round's anchor is set against
its own round's peak.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

#: Seconds each matmul rate is timed for; the best of `WINDOWS` windows counts.
WINDOW_S = 0.4
WINDOWS = 3


def flops_per_sentence(model: Any, texts: list[str], batch: int = 32) -> tuple[float, float]:
    """(FLOPs a sentence, mean padded width) of a sentence-transformers model's encoder on
    `texts`, batched as its `encode` batches them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    encoder, tokenizer = model[0].auto_model, model.tokenizer
    ordered = sorted(texts, key=len, reverse=True)
    flops = widths = 0.0
    with torch.inference_mode():
        for start in range(0, len(ordered), batch):
            chunk = ordered[start : start + batch]
            features = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            counter = FlopCounterMode(display=False)
            with counter:
                encoder(**features)
            flops += counter.get_total_flops()
            widths += features["input_ids"].shape[1] * len(chunk)
    return flops / len(texts), widths / len(texts)


def _best(step: Any, flops: float) -> float:
    """GFLOP/s of `step` (one matmul of `flops`), the best of the timed windows."""
    step()
    best = 0.0
    for _ in range(WINDOWS):
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < WINDOW_S:
            step()
            count += 1
        best = max(best, flops * count / elapsed / 1e9)
    return best


def matmul_peak(rows: int, k: int, n: int, bf16: bool, threads: int) -> dict[str, float]:
    """GFLOP/s of one [rows, k] x [k, n] matmul, per library: torch (oneDNN/MKL) and
    OpenVINO's CPU plugin, `threads` threads, in bf16 or fp32."""
    import openvino as ov
    import torch
    from openvino import opset13 as ops

    flops = 2.0 * rows * k * n
    generator = np.random.default_rng(0)
    a = generator.standard_normal((rows, k), dtype=np.float32)
    b = generator.standard_normal((k, n), dtype=np.float32)
    dtype = torch.bfloat16 if bf16 else torch.float32
    ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            rates = {"torch": _best(lambda: torch.mm(ta, tb), flops)}
    finally:
        torch.set_num_threads(before)
    parameter = ops.parameter([rows, k], ov.Type.f32)
    graph = ov.Model([ops.matmul(parameter, ops.constant(b), False, False)], [parameter])
    compiled = ov.Core().compile_model(
        graph,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
        },
    )
    request = compiled.create_infer_request()
    rates["OpenVINO"] = _best(lambda: request.infer({0: a}), flops)
    return rates


class Ceiling:
    """FLOPs a sentence of the anchor's model on the bench's texts, and this CPU's matmul
    peak at that model's shape, sampled in every round beside the anchor (the host's speed
    drifts between rounds, so each round's anchor is set against its own round's peak)."""

    def __init__(self, model: Any, texts: list[str], threads: int) -> None:
        self.flops, self.width = flops_per_sentence(model, texts)
        config = model[0].auto_model.config
        self.shape = (round(32 * self.width), config.hidden_size, config.intermediate_size)
        self.threads = threads
        self.rounds: list[tuple[float, float, dict[str, float]]] = []

    def beside(self, anchor: Any, precision: str) -> Any:
        """`anchor` (a callable giving sentences/s) that also samples the peak after it."""

        def run() -> float:
            rate = anchor()
            peaks = matmul_peak(*self.shape, precision == "bf16", self.threads)
            self.rounds.append((rate, max(peaks.values()), peaks))
            return rate

        self.rounds = []
        return run

    def row(
        self, precision: str, model: str, http: float, target: float
    ) -> tuple[str, str, str, str]:
        """The row of the rounds sampled since `beside`: medians over the rounds."""
        anchors = [rate for rate, _, _ in self.rounds]
        ceilings = [peak * 1e9 / self.flops for _, peak, _ in self.rounds]
        reach = statistics.median(c / a for c, a in zip(ceilings, anchors, strict=True))
        ceiling, anchor = statistics.median(ceilings), statistics.median(anchors)
        best = max(self.rounds, key=lambda r: r[1])[2]
        libraries = ", ".join(f"{name} {rate:.0f}" for name, rate in best.items())
        within = "within" if reach >= target else "beyond"
        return (
            f"embeddings ceiling, {precision}: the sentences/s this CPU's {precision} matmuls "
            f"allow MiniLM ({self.flops / 1e9:.2f} GFLOP a sentence, {self.width:.0f} tokens "
            f"padded; matmul {self.shape[0]}×{self.shape[1]}×{self.shape[2]})",
            f"{model} {http:.0f}, 32 texts per request ({http / ceiling:.0%} of the ceiling)",
            f"sentence-transformers encode(batch_size=32), fp32 {anchor:.0f} "
            f"({anchor / ceiling:.0%} of the {precision} ceiling)",
            f"ceiling {ceiling:.0f} = {reach:.2f}× the anchor (medians of {len(anchors)} "
            f"rounds, the peak sampled in each): a {target}× target is {within} this CPU's "
            f"reach (best round's matmul peak, GFLOP/s: {libraries})",
        )
