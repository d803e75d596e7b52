"""Classification and captioning through transformers, batched per call.

text-classification and image-classification use transformers pipelines; transformers
5 has no image-to-text pipeline, so captioning calls `generate` on an
`AutoModelForImageTextToText` (e.g. a vision-encoder-decoder) directly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dify_serving.engines.base import Engine
from dify_serving.engines.protocol import EngineError, PredictionRequest
from dify_serving.specs import DifyModelSpec, Task


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
            from transformers import pipeline

            self.pipe = pipeline(  # type: ignore[call-overload]
                str(self.task),
                model=path,
                revision=spec.revision,
                device=self.device,
                dtype=self.dtype,
            )
            self.model = self.pipe.model

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
