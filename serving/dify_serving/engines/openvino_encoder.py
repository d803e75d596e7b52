"""An encoder's forward pass on OpenVINO: converted once, cached, compiled per replica.

PyTorch's CPU kernels leave most of this machine's throughput unused on small encoders
(docs/benchmarks.md); OpenVINO's reach the fp32 peak and use AVX-512 bf16 where the CPU
has it. The Hugging Face model is converted in memory (`openvino.convert_model`, no ONNX
file in between) on the first load of a (weights, revision, OpenVINO version) and the IR
is saved under `$DIFY_MIRROR_HOME/compiled/openvino/<key>/`, written to a scratch folder
and renamed into place, so a replica that dies mid-conversion leaves nothing half-written
and the next load reads the IR without touching torch.

Precision is a compile-time hint on the same fp32 IR: `f32` runs fp32 end to end
(vectors match torch's to 1e-6), `bf16` runs matmuls in bf16 where the CPU supports it.
A CPU without bf16 runs fp32 and says so (`note`), never silently slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dify_serving.engines import progress
from dify_serving.engines.base import written_in_place
from dify_serving.specs import Precision, Runtime

log = logging.getLogger(__name__)

IR_FILE = "model.xml"


def cache_dir(home: Path, weights: str, revision: str | None, head: str) -> Path:
    """The IR's folder: keyed by the weights' real path, revision, the head converted
    (the same weights give an encoder and a classifier) and OpenVINO's version."""
    import openvino

    key = f"{os.path.realpath(weights)}|{revision or ''}|{head}|{openvino.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return home / "compiled" / "openvino" / digest


def convert(model: Any, folder: Path) -> None:
    """Convert a Hugging Face encoder (token ids, mask → its first output: the last
    hidden state, or a classifier's logits) to IR."""
    import openvino as ov
    import torch

    example = {
        "input_ids": torch.ones((2, 8), dtype=torch.int64),
        "attention_mask": torch.ones((2, 8), dtype=torch.int64),
    }
    shapes = [
        ("input_ids", ov.PartialShape([-1, -1]), ov.Type.i64),
        ("attention_mask", ov.PartialShape([-1, -1]), ov.Type.i64),
    ]
    with torch.inference_mode(), warnings.catch_warnings():
        # tracing notes shape checks it turns into constants; none depends on the shape
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        converted = ov.convert_model(model, example_input=example, input=shapes)
    with written_in_place(folder, IR_FILE) as scratch:
        ov.save_model(converted, scratch / IR_FILE, compress_to_fp16=False)


def open_for(engine: Any, head: str, streams: int, threads: int) -> OpenVinoEncoder | None:
    """The compiled encoder of `engine.model` (converted on the first load of its weights,
    cached); None after a failure, with the engine switched to torch and the reason in
    its `runtime_note`: torch still serves."""
    folder = cache_dir(engine.home, engine.path, engine.spec.revision, head)
    try:
        if not (folder / IR_FILE).is_file():
            progress.report(
                "converting to OpenVINO IR (first load of these weights; cached afterwards)"
            )
            convert(engine.model, folder)
        bf16 = engine.precision == Precision.BF16
        encoder = OpenVinoEncoder(folder, bf16, streams, threads)
    except Exception as exc:  # any conversion failure
        log.warning("%s: OpenVINO failed, running torch: %s", engine.name, exc)
        engine.runtime = Runtime.TORCH
        engine.runtime_note = f"openvino failed ({type(exc).__name__}); running torch"
        engine.model.to(engine.dtype)
        return None
    engine.runtime_note = encoder.note or engine.runtime_note
    return encoder


class OpenVinoEncoder:
    """The compiled encoder; `forward` is safe to call from several threads at once (one
    infer request per thread, `streams` of them running in parallel)."""

    def __init__(self, folder: Path, bf16: bool, streams: int, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        supported = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.precision = "bf16" if bf16 and "BF16" in supported else "fp32"
        self.note = (
            "bf16 asked, but this CPU has no bf16 support: running fp32"
            if bf16 and self.precision != "bf16"
            else None
        )
        if self.note:
            log.warning("%s", self.note)
        self.compiled = core.compile_model(
            core.read_model(folder / IR_FILE),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": threads,
                "NUM_STREAMS": streams,
            },
        )
        self._output = self.compiled.output(0)
        self._local = threading.local()

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The first output in float32 (an encoder's last hidden state [batch, tokens,
        hidden], a classifier's logits [batch, labels]) for padded int64 ids."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({"input_ids": ids, "attention_mask": mask})
        return np.asarray(result[self._output], dtype=np.float32)
