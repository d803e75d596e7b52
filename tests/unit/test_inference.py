"""The generation stream's idle clock, in-process with a stand-in replica stream.

`/v1/inference` over real HTTP, and the idle timeout against a real Serve replica, are
in `tests/stack/test_inference.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_slow_stream_client_is_not_taken_for_a_silent_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle clock measures the model: the time a client takes per item is not silence.

    In-process, with a stand-in replica stream (the stack's test covers Ray's):
    the model sends every 0.5 s and the client takes 0.7 s per item, so 1.2 s pass
    between two items while the model is never silent for more than 0.5 s.
    """
    import asyncio

    from dify_serving.engines.protocol import GenerationRequest, Generator
    from dify_serving.gateway.state import GatewayState
    from dify_serving.options import GatewayOptions, LimitOptions

    class Stream:
        def __init__(self) -> None:
            self.sent, self.cancelled = 0, False

        def __aiter__(self) -> Stream:
            return self

        async def __anext__(self) -> dict[str, str]:
            if self.sent == 3:
                raise StopAsyncIteration
            await asyncio.sleep(0.5)
            if self.cancelled:  # as a cancelled Serve response does
                raise RuntimeError("request cancelled")
            self.sent += 1
            return {"delta": str(self.sent)}

        def cancel(self) -> None:
            self.cancelled = True

    class Handle:
        def options(self, **_: object) -> Handle:
            return self

        def __getattr__(self, method: str) -> Handle:
            return self

        def remote(self, *_: object) -> Stream:
            return Stream()

    state = GatewayState(
        GatewayOptions(home=str(tmp_path), limits=LimitOptions(stream_idle_timeout_s=1.0))
    )
    monkeypatch.setattr(state.model_replicas, "handle", lambda name: Handle())

    async def read_slowly() -> list[str]:
        deltas = []
        async for item in state.model_replicas.stream(
            "slow", Generator.generate_stream, GenerationRequest("x")
        ):
            deltas.append(item["delta"])
            await asyncio.sleep(0.7)
        return deltas

    assert asyncio.run(read_slowly()) == ["1", "2", "3"]
