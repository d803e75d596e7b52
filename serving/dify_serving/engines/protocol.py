"""What an engine is asked and what it answers: typed contracts, one Protocol per capability.

A model serves one or more capabilities (KServe's `OpenAIGenerativeModel` and
`OpenAIEncoderModel` idea): a `Generator` writes text, an `Embedder` turns text into
vectors, a `Predictor` labels or captions inputs. The gateway's replica clients speak
these types; the Serve deployment exposes exactly the methods of the capabilities its
engine has (`capability_methods`), so adding a task means an engine that implements a
Protocol (a new one only for a new kind of answer) and a line in `registry.py`.

Requests and results are slotted dataclasses rather than pydantic models: they cross a
Ray call on every request (pickled by value, vectors as one numpy array) and are built
by trusted code after the gateway has validated the wire format.

This module stays light (no torch, no transformers): the gateway imports it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dify_serving.errors import DifyError


class EngineError(DifyError):
    """A request or model the engine refuses (status, code, message)."""


class InputTooLong(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__(413, "input_too_long", message)


# ---- generation ---------------------------------------------------------------------------
@dataclass(slots=True)
class GenerationRequest:
    """A prompt or a conversation, with the model's defaults and limits already applied."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def chars(self) -> int:
        """Characters of input (decides whether tokenizing leaves the event loop)."""
        if self.messages:
            return sum(len(str(m.get("content") or "")) for m in self.messages)
        return len(self.prompt or "")


@dataclass(slots=True)
class Generation:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class GenerationDelta:
    """New text of a stream; the last one has `finish_reason` and the token counts."""

    delta: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


# ---- embeddings ---------------------------------------------------------------------------
@dataclass(slots=True)
class EmbedRequest:
    """Texts to embed. `offset` places a slice of a larger request (error positions)."""

    texts: list[str]
    truncate: bool = False
    offset: int = 0


@dataclass(slots=True)
class Embeddings:
    vectors: np.ndarray  # float32, one L2-normalised row per text
    prompt_tokens: int


# ---- prediction ---------------------------------------------------------------------------
@dataclass(slots=True)
class PredictionRequest:
    """Texts (classification) or base64 images (image classification, captioning)."""

    inputs: list[Any]
    top_k: int | None = None
    max_tokens: int | None = None


# ---- capabilities -------------------------------------------------------------------------
@runtime_checkable
class Generator(Protocol):
    async def generate(self, request: GenerationRequest) -> Generation: ...

    def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...


@runtime_checkable
class Embedder(Protocol):
    async def embed(self, texts: list[str], truncate: bool = False) -> Embeddings: ...

    async def embed_each(self, requests: list[EmbedRequest]) -> list[Embeddings | EngineError]:
        """Several requests in one call; an over-long input fails only its own request."""
        ...

    async def embed_tokens(self, rows: list[list[int]]) -> np.ndarray:
        """Vectors for rows the caller tokenized (an index's chunker)."""
        ...


@runtime_checkable
class Predictor(Protocol):
    async def predict(self, request: PredictionRequest) -> list[Any]: ...


#: The methods a Serve replica exposes for each capability its engine has.
CAPABILITIES: dict[type[Any], tuple[str, ...]] = {
    Generator: ("generate", "generate_stream"),
    Embedder: ("embed_each", "embed_tokens"),
    Predictor: ("predict",),
}


def capability_methods(engine: object) -> list[str]:
    """The replica methods of every capability `engine` implements."""
    return [
        m for kind, methods in CAPABILITIES.items() if isinstance(engine, kind) for m in methods
    ]
