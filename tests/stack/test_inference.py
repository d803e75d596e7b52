"""`POST /v1/inference` over real HTTP against the real stack."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest


def sse_events(response: httpx.Response) -> list[tuple[str, str]]:
    events, kind = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, line[6:]))
            kind = "message"
    return events


def test_generation_answers_with_usage(client: httpx.Client) -> None:
    r = client.post(
        "/v1/inference",
        json={"model": "demo-llm", "prompt": "hello there", "max_tokens": 12, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "demo-llm" and isinstance(body["output"], str)
    assert body["usage"]["prompt_tokens"] > 0
    assert 1 <= body["usage"]["completion_tokens"] <= 12
    assert body["finish_reason"] in ("stop", "length")
    assert r.headers["x-request-id"] == body["id"]


def test_greedy_and_seeded_sampling_repeat(client: httpx.Client) -> None:
    def run(**params: object) -> str:
        r = client.post(
            "/v1/inference",
            json={"model": "demo-llm", "prompt": "once upon", "max_tokens": 16, **params},
            headers={"Cache-Control": "no-cache"},  # the engine repeats, not the cache
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-cache"] == "MISS"
        return str(r.json()["output"])

    assert run(temperature=0) == run(temperature=0)
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    seeds = {run(temperature=1.5, top_p=1.0, seed=s) for s in range(4)}
    assert len(seeds) > 1, "different seeds should sample differently"


def test_model_may_be_left_out(client: httpx.Client) -> None:
    r = client.post("/v1/inference", json={"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "demo-llm"


def test_stream_sends_deltas_then_done(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/v1/inference",
        json={
            "model": "demo-llm",
            "prompt": "stream me",
            "max_tokens": 10,
            "temperature": 0,
            "stream": True,
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == ("message", "[DONE]")
    chunks = [json.loads(d) for k, d in events[:-1]]
    assert all(k == "message" for k, _ in events)
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] <= 10
    streamed = "".join(c["delta"] for c in chunks)
    sync = client.post(
        "/v1/inference",
        json={"model": "demo-llm", "prompt": "stream me", "max_tokens": 10, "temperature": 0},
    ).json()
    assert streamed == sync["output"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "demo-llm", "prompt": "x", "temperature": -1}, 422, "temperature"),
        ({"model": "demo-llm", "prompt": "x", "top_p": 0}, 422, "top_p"),
        ({"model": "demo-llm", "prompt": "x", "top_p": 1.5}, 422, "top_p"),
        ({"model": "demo-llm", "prompt": "x", "max_tokens": 100000}, 422, "max_tokens"),
        ({"model": "demo-llm", "prompt": "x", "max_tokens": 65}, 422, "64"),
        ({"model": "demo-llm", "prompt": ""}, 422, "prompt"),
        ({"model": "demo-llm", "prompt": "x", "bogus": 1}, 422, "bogus"),
        ({"model": "nope", "prompt": "x"}, 404, "nope"),
        ({"model": "demo-llm", "prompt": "word " * 400}, 413, "256"),
    ],
)
def test_bad_input_gets_a_clear_json_error(
    client: httpx.Client, body: dict, status: int, needle: str
) -> None:
    r = client.post("/v1/inference", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    assert error["code"] and error["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text


def test_malformed_json_is_400(client: httpx.Client) -> None:
    r = client.post(
        "/v1/inference", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed_json"


def test_unknown_route_is_json_404(client: httpx.Client) -> None:
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_failed_model_answers_503_with_its_reason(client: httpx.Client) -> None:
    r = client.post("/v1/inference", json={"model": "broken", "prompt": "x"})
    assert r.status_code == 503
    assert "no-weights" in r.json()["error"]["message"]


def test_embedding_through_inference(client: httpx.Client) -> None:
    r = client.post("/v1/inference", json={"model": "minilm", "input": "a sentence"})
    assert r.status_code == 200, r.text
    assert len(r.json()["output"]) == 384


def test_text_classification(client: httpx.Client) -> None:
    r = client.post(
        "/v1/inference", json={"model": "sentiment", "input": ["good", "bad"], "top_k": 2}
    )
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    assert len(out) == 2 and {x["label"] for x in out[0]} == {"positive", "negative"}
    assert abs(sum(x["score"] for x in out[0]) - 1) < 1e-3


def test_image_classification_and_captioning(client: httpx.Client) -> None:
    from tiny_models import png_base64

    r = client.post("/v1/inference", json={"model": "vit", "input": png_base64(), "top_k": 2})
    assert r.status_code == 200, r.text
    assert [x["label"] in {"cat", "dog", "bird"} for x in r.json()["output"]] == [True, True]
    r = client.post(
        "/v1/inference", json={"model": "captioner", "input": [png_base64()], "max_tokens": 5}
    )
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["output"][0]["generated_text"], str)
    r = client.post("/v1/inference", json={"model": "vit", "input": "not-an-image"})
    assert r.status_code == 422 and "image" in r.json()["error"]["message"]


def test_a_50_mb_prompt_is_refused_in_the_gateway(client: httpx.Client) -> None:
    body = b'{"model": "demo-llm", "prompt": "' + b"x" * (50 * 1024 * 1024) + b'"}'
    r = client.post("/v1/inference", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    message = r.json()["error"]["message"]
    assert "DIFY_MIRROR_MAX_BODY_BYTES" in message and str(16 * 1024 * 1024) in message
    r = client.post("/v1/inference", json={"model": "demo-llm", "prompt": "x" * 600_000})
    assert r.status_code == 413 and "524288" in r.json()["error"]["message"]
    assert "AioRpcError" not in r.text


def test_a_silent_stream_ends_with_an_error_and_its_replica_call_is_cancelled(
    stack: object, tmp_path: Path
) -> None:
    """A replica that stops sending: the stream ends after the idle timeout, as SSE."""
    import asyncio

    from ray import serve
    from ray.serve.context import _get_global_client

    from dify_serving.engines.protocol import GenerationRequest, Generator
    from dify_serving.gateway.routers.sse import sse_stream
    from dify_serving.gateway.state import GatewayState
    from dify_serving.options import GatewayOptions, LimitOptions
    from dify_serving.render import model_app_name

    @serve.deployment(name="ModelServer", ray_actor_options={"num_cpus": 0})
    class Silent:
        def __init__(self) -> None:
            self.cancelled = False

        async def generate_stream(self, request: dict) -> object:
            yield {"delta": "first"}
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled = True
                raise

        def was_cancelled(self) -> bool:
            return self.cancelled

    app = model_app_name("silent")
    serve.run(Silent.bind(), name=app, route_prefix=None)
    try:
        state = GatewayState(
            GatewayOptions(home=str(tmp_path), limits=LimitOptions(stream_idle_timeout_s=1.0))
        )

        async def run() -> tuple[list[bytes], bool]:
            try:
                frames = [
                    f
                    async for f in sse_stream(
                        state.model_replicas.stream(
                            "silent", Generator.generate_stream, GenerationRequest("x")
                        ),
                        "r1",
                    )
                ]
                handle = serve.get_app_handle(app)
                for _ in range(50):  # the cancellation reaches the replica shortly after
                    if await handle.was_cancelled.remote():
                        return frames, True
                    await asyncio.sleep(0.1)
                return frames, False
            finally:
                # The handles' router runs on this loop (the stack sets
                # RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0): shut it down before asyncio.run
                # closes the loop, or the stack's serve.shutdown() trips over it later.
                await _get_global_client().shutdown_cached_handles_async()

        frames, cancelled = asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        serve.delete(app)
    assert json.loads(frames[0].decode()[6:]) == {"delta": "first"}
    assert frames[1].startswith(b"event: error\n")
    error = json.loads(frames[1].decode().split("data: ", 1)[1])["error"]
    assert error["code"] == "stream_idle_timeout" and "1s" in error["message"]
    assert frames[2] == b"data: [DONE]\n\n" and len(frames) == 3
    assert cancelled, "the replica's generator was never cancelled"
