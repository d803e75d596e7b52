"""Server-sent events: how every streaming route frames its chunks and its errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from dify_serving.errors import DifyError
from dify_serving.gateway.errors import error_body

log = logging.getLogger(__name__)

#: The `responses` of a route that streams when asked (`stream: true`), or always.
STREAMS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The answer; with `stream: true`, server-sent events ending `[DONE]`",
        "content": {
            "text/event-stream": {
                "schema": {  # each event: JSON in `data` (`[DONE]` last), `event: error` on failure
                    "type": "object",
                    "required": ["data"],
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                }
            }
        },
    }
}


def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


async def sse_stream(chunks: AsyncIterator[Any], request_id: str) -> AsyncIterator[bytes]:
    """Frame chunks as SSE; an error mid-stream becomes an `error` event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except DifyError as exc:
        yield sse(error_body(exc.code, exc.message, request_id), event="error")
    except Exception:  # never leave a client hanging on a broken stream
        log.exception("stream %s failed", request_id)
        message = "the stream failed; see the server logs"
        yield sse(error_body("internal_error", message, request_id), event="error")
    yield sse("[DONE]")
