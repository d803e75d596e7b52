"""What runs an embedding model's forward pass (`spec.engine`): OpenVINO against torch.

The quality guard: fp32 on OpenVINO gives torch's vectors (cosine ≥ 0.9999); bf16 stays
within cosine 0.999 and keeps the nearest neighbours of a fixed corpus. Conversion runs
once per weights and is cached; a failed one falls back to torch and says so.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tiny_models import minilm_path

from dify_serving.engines import openvino_encoder, runtimes
from dify_serving.engines.embeddings import EmbeddingEngine
from dify_serving.engines.protocol import EngineError
from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions
from dify_serving.specs import DifyModelSpec, Runtime

WORDS = (
    "river mountain invoice refund password router kernel vaccine tariff orbit violin "
    "harvest mortgage glacier compiler allergy satellite recipe contract battery "
    "telescope insurance protein election warehouse algorithm museum parliament "
    "volcano pension keyboard migraine railway turbine lawsuit cathedral"
).split()


def corpus(n: int = 200) -> list[str]:
    """A fixed, varied corpus: seeded word salad of 6–20 words."""
    rng = random.Random(7)
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 20))) for _ in range(n)]


def spec(**fields: Any) -> DifyModelSpec:
    return DifyModelSpec.model_validate(
        {"modelId": minilm_path(), "task": "feature-extraction", **fields}
    )


def vectors(engine: EmbeddingEngine, texts: list[str]) -> np.ndarray:
    async def run() -> np.ndarray:
        return (await engine.embed(texts)).vectors

    return asyncio.run(run())


def top10(v: np.ndarray) -> list[set[int]]:
    sims = v @ v.T
    return [set(np.argsort(-row)[1:11].tolist()) for row in sims]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion shared by the precision tests (the cache test has its own)."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    engine = EmbeddingEngine("minilm", spec(engine="torch"), minilm_path())
    assert engine.info()["engine"] == "torch"
    return vectors(engine, corpus())


def test_openvino_fp32_gives_torchs_vectors(reference: np.ndarray, home: Path) -> None:
    engine = EmbeddingEngine("minilm", spec(engine="openvino"), minilm_path(), home=home)
    info = engine.info()
    assert (info["engine"], info["precision"]) == ("openvino", "fp32")
    got = vectors(engine, corpus())
    assert (got * reference).sum(1).min() >= 0.9999
    assert top10(got) == top10(reference)


def test_openvino_bf16_keeps_the_neighbours(reference: np.ndarray, home: Path) -> None:
    engine = EmbeddingEngine(
        "minilm", spec(engine="openvino", precision="bf16"), minilm_path(), home=home
    )
    if engine.info().get("engine_note"):  # a CPU without bf16 runs fp32 and says so
        assert engine.info()["precision"] == "fp32"
    got = vectors(engine, corpus())
    assert (got * reference).sum(1).min() >= 0.999
    agreement = np.mean(
        [len(a & b) / 10 for a, b in zip(top10(got), top10(reference), strict=True)]
    )
    assert agreement >= 0.99, agreement


def test_conversion_runs_once_per_weights_and_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = EmbeddingEngine("a", spec(engine="openvino"), minilm_path(), home=tmp_path)
    folders = list((tmp_path / "compiled" / "openvino").iterdir())
    assert len(folders) == 1 and (folders[0] / openvino_encoder.IR_FILE).is_file()
    assert not [p for p in folders[0].parent.iterdir() if p.name.startswith(".")]  # no scratch

    def no_second_conversion(*_: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino_encoder, "convert", no_second_conversion)
    second = EmbeddingEngine("b", spec(engine="openvino"), minilm_path(), home=tmp_path)
    assert second.info()["engine"] == "openvino" and second.model is None
    texts = corpus(8)
    assert np.allclose(vectors(first, texts), vectors(second, texts), atol=1e-6)


def test_a_failed_conversion_falls_back_to_torch_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("unsupported operation aten::frobnicate")

    monkeypatch.setattr(openvino_encoder, "convert", broken)
    engine = EmbeddingEngine("m", spec(engine="openvino"), minilm_path(), home=tmp_path)
    info = engine.info()
    assert info["engine"] == "torch"
    assert info["engine_note"] == "openvino failed (RuntimeError); running torch"
    assert vectors(engine, ["still serves"]).shape == (1, 384)


def test_auto_picks_openvino_on_cpu_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtimes.resolve(spec()) == Runtime.OPENVINO
    assert runtimes.resolve(spec(engine="torch")) == Runtime.TORCH
    real = runtimes.installed
    monkeypatch.setattr(
        runtimes, "installed", lambda r, task=None: r != Runtime.OPENVINO and real(r, task)
    )
    assert runtimes.resolve(spec()) == Runtime.TORCH
    with pytest.raises(EngineError) as missing:
        runtimes.resolve(spec(engine="openvino"))
    assert missing.value.status == 422 and "dify-mirror[openvino]" in missing.value.message


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"task": "image-classification", "engine": "openvino"}, "serves feature-extraction"),
        ({"device": "cuda", "engine": "openvino"}, "serves device cpu"),
    ],
)
def test_an_engine_that_cannot_serve_is_refused_by_name(
    tmp_path: Path, fields: dict[str, str], words: str
) -> None:
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    body = {"name": "m", "modelId": "some/model", "task": "feature-extraction", **fields}
    with TestClient(create_app(GatewayState(options)), raise_server_exceptions=False) as http:
        r = http.post("/v1/models/load", json=body)
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text


def test_an_engine_that_is_not_installed_is_refused_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name)
    )
    options = GatewayOptions(home=str(tmp_path), security=SecurityOptions(enabled=False))
    body = {"name": "m", "modelId": "some/model", "task": "feature-extraction"}
    with TestClient(create_app(GatewayState(options)), raise_server_exceptions=False) as http:
        r = http.post("/v1/models/load", json={**body, "engine": "openvino"})
    error = r.json()["error"]
    assert (r.status_code, error["code"]) == (422, "engine_not_installed")
    assert "pip install 'dify-mirror[openvino]'" in error["message"]


def test_openvino_classifier_gives_torchs_labels_and_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """text-classification on CPU: the pipeline keeps its scoring, OpenVINO runs the
    forward pass; labels and scores match torch's, top_k and truncation included."""
    from tiny_models import text_classifier

    from dify_serving.engines.pipelines import PipelineEngine
    from dify_serving.engines.protocol import PredictionRequest

    path = str(text_classifier(tmp_path / "clf"))
    texts = [*corpus(20), "word " * 2000]  # the last one is truncated by the pipeline

    def classify(engine: PipelineEngine) -> list[Any]:
        return asyncio.run(engine.predict(PredictionRequest(inputs=texts, top_k=2)))

    def clf(**fields: Any) -> DifyModelSpec:
        return spec(modelId=path, task="text-classification", **fields)

    reference = classify(PipelineEngine("t", clf(engine="torch"), path))
    calls = []
    forward = openvino_encoder.OpenVinoEncoder.forward
    monkeypatch.setattr(
        openvino_encoder.OpenVinoEncoder,
        "forward",
        lambda self, *a: calls.append(len(a[0])) or forward(self, *a),
    )
    engine = PipelineEngine("o", clf(), path, home=tmp_path)  # auto: OpenVINO on CPU
    info = engine.info()
    assert (info["engine"], info["precision"]) == ("openvino", "fp32")
    got = classify(engine)
    assert [[r["label"] for r in row] for row in got] == [
        [r["label"] for r in row] for row in reference
    ]
    scores = np.array([[r["score"] for r in row] for row in got])
    assert np.allclose(scores, [[r["score"] for r in row] for row in reference], atol=1e-5)
    assert sum(calls) == len(texts)  # every row went through OpenVINO
    assert list((tmp_path / "compiled" / "openvino").iterdir())  # converted and cached
