"""Stand-in HTTP servers on real ports, for code under test that speaks HTTP (a Ray
dashboard, a Qdrant server): a handler class served on 127.0.0.1, on a free port, from a
daemon thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """Answers with `reply` and logs nothing (the test's output stays the test's)."""

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class StubServer:
    """`handler` served at `url` until `close`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def recording_qdrant() -> Iterator[tuple[str, list[str]]]:
    """A stand-in Qdrant server: (its URL, the paths it was asked to DELETE, in order)."""
    seen: list[str] = []

    class Handler(QuietHandler):
        def do_DELETE(self) -> None:
            seen.append(self.path)
            self.reply(200, b"{}")

    server = StubServer(Handler)
    try:
        yield server.url, seen
    finally:
        server.close()
