"""The official openai client works against /v1 unchanged."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from support import API_KEY, AUTH


@pytest.fixture()
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)


def test_chat_completion(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model="demo-llm",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=8,
        temperature=0,
    )
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.completion_tokens <= 8


def test_chat_completion_stream_matches_sync(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "count"}]
    sync = oai.chat.completions.create(
        model="demo-llm", messages=messages, max_tokens=8, temperature=0
    )
    chunks = list(
        oai.chat.completions.create(
            model="demo-llm",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == sync.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length")


def test_completions_sync_and_stream(oai: openai.OpenAI) -> None:
    sync = oai.completions.create(model="demo-llm", prompt="The sky", max_tokens=6, temperature=0)
    assert sync.object == "text_completion"
    stream = oai.completions.create(
        model="demo-llm", prompt="The sky", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == sync.choices[0].text


def test_embeddings_float_and_base64(oai: openai.OpenAI) -> None:
    default = oai.embeddings.create(model="minilm", input=["one", "two"])  # base64 on the wire
    floats = oai.embeddings.create(model="minilm", input="one", encoding_format="float")
    a = np.array(default.data[0].embedding)
    b = np.array(floats.data[0].embedding)
    assert a.shape == (384,) and np.allclose(a, b, atol=1e-6)
    assert default.usage.prompt_tokens > 0 and len(default.data) == 2


def test_models_list(oai: openai.OpenAI) -> None:
    ids = {m.id for m in oai.models.list()}
    assert {"demo-llm", "minilm"} <= ids


def test_errors_map_to_openai_exceptions(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):  # 400: wrong task for the route
        oai.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="demo-llm", messages=[], max_tokens=4)


def test_base64_roundtrip_is_little_endian_float32(base_url: str) -> None:
    import httpx

    r = httpx.post(
        f"{base_url}/v1/embeddings",
        json={"model": "minilm", "input": "x", "encoding_format": "base64"},
        headers=AUTH,
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(raw) == 384 * 4
