"""Classification and captioning through transformers, batched per call.

text-classification and image-classification use transformers pipelines; transformers
5 has no image-to-text pipeline, so captioning calls `generate` on an
`AutoModelForImageTextToText` (e.g. a vision-encoder-decoder) directly.

On CPU, text-classification's forward pass runs on OpenVINO (`engine: auto` or
`openvino`), converted and cached as the embeddings engine's is: the pipeline keeps its
tokenizing, truncation and scoring (softmax, sigmoid, top_k), only the model's forward
changes, so labels and scores match torch's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dify_serving.engines import runtimes
from dify_serving.engines.base import Engine
from dify_serving.engines.protocol import EngineError, PredictionRequest
from dify_serving.specs import DifyModelSpec, Runtime, Task

log = logging.getLogger(__name__)


def decode_image(item: Any) -> Any:
    """A base64 string (optionally a data: URL) → PIL image."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(item, str):
        raise EngineError(422, "invalid_input", "images must be base64 strings or data: URLs")
    data = item.split(",", 1)[1] if item.startswith("data:") else item
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, ValueError) as exc:
        raise EngineError(422, "invalid_input", f"not a decodable image: {exc}") from None


def _images(items: list[Any]) -> list[Any]:
    return [decode_image(item) for item in items]


class PipelineEngine(Engine):
    def __init__(
        self, name: str, spec: DifyModelSpec, path: str, *, home: Path | None = None
    ) -> None:
        super().__init__(name, spec, path, home=home)
        self.task = Task(spec.task)
        # Serve admits at most max_concurrent_requests calls per replica (callers bound
        # what waits, gateway/inflight.py): this worker's queue is bounded by that.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipe-{name}")
        if self.task == Task.IMAGE_TO_TEXT:
            from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

            self.processor = AutoImageProcessor.from_pretrained(path, revision=spec.revision)
            self.tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision)
            self.model = AutoModelForImageTextToText.from_pretrained(
                path, revision=spec.revision, dtype=self.dtype
            ).to(self.device)  # type: ignore[arg-type]
            self.model.eval()
        else:
            import torch
            from transformers import pipeline

            self.runtime = runtimes.resolve(spec)
            self.pipe = pipeline(  # type: ignore[call-overload]
                str(self.task),
                model=path,
                revision=spec.revision,
                device=self.device,
                # OpenVINO converts fp32 weights; its precision is a compile-time hint
                dtype=torch.float32 if self.runtime == Runtime.OPENVINO else self.dtype,
            )
            self.model = self.pipe.model
            if self.runtime == Runtime.OPENVINO:
                self._open_openvino(torch.get_num_threads())

    def _open_openvino(self, threads: int) -> None:
        """Convert (once; cached) and run the classifier's forward on OpenVINO; on a
        failed conversion, torch runs it and `info()` says why."""
        import torch
        from transformers.modeling_outputs import SequenceClassifierOutput

        from dify_serving.engines import openvino_encoder as openvino

        encoder = openvino.open_for(self, "classifier", 1, threads)
        if encoder is None:
            return
        self.encoder_precision = encoder.precision
        torch_forward = self.model.forward

        def forward(
            input_ids: Any, attention_mask: Any, token_type_ids: Any = None, **rest: Any
        ) -> Any:
            if (token_type_ids is not None and bool(token_type_ids.any())) or rest:
                # a second segment (the IR was traced with one): torch's forward
                return torch_forward(input_ids, attention_mask, token_type_ids, **rest)
            logits = encoder.forward(input_ids.numpy(), attention_mask.numpy())
            return SequenceClassifierOutput(logits=torch.from_numpy(logits))

        self.model.forward = forward

    def info(self) -> dict[str, Any]:
        info = super().info()
        runtime = getattr(self, "runtime", Runtime.TORCH)
        info["engine"] = str(runtime)
        if runtime == Runtime.OPENVINO:
            info["precision"] = self.encoder_precision
        return info

    async def predict(self, request: PredictionRequest) -> list[Any]:
        """Runs on the engine's worker thread, image decoding included (not on the loop)."""
        inputs = request.inputs
        if not inputs:
            raise EngineError(422, "invalid_input", "input must not be empty")
        if self.task == Task.TEXT_CLASSIFICATION:
            if not all(isinstance(i, str) and i for i in inputs):
                raise EngineError(422, "invalid_input", "text-classification takes strings")
            work = lambda: self._classify_text(inputs, request)  # noqa: E731
        elif self.task == Task.IMAGE_CLASSIFICATION:
            work = lambda: self._classify_images(_images(inputs), request)  # noqa: E731
        else:
            work = lambda: self._caption(_images(inputs), request)  # noqa: E731
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _classify_text(self, texts: list[str], request: PredictionRequest) -> list[Any]:
        top_k = request.top_k or 1
        out = self.pipe(texts, top_k=top_k, truncation=True)
        return [row if isinstance(row, list) else [row] for row in out]

    def _classify_images(self, images: list[Any], request: PredictionRequest) -> list[Any]:
        top_k = request.top_k or 5
        out = self.pipe(images, top_k=top_k)
        return [row if isinstance(row, list) else [row] for row in out]

    def _caption(self, images: list[Any], request: PredictionRequest) -> list[Any]:
        import torch

        max_new = min(int(request.max_tokens or 32), self.spec.generation.max_new_tokens)
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        with torch.inference_mode():
            ids = self.model.generate(
                pixel_values=pixels.to(self.device, self.dtype), max_new_tokens=max_new
            )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [{"generated_text": t.strip()} for t in texts]
