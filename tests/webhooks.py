"""A webhook receiver on 127.0.0.1 for task tests: keeps each signed body it is sent.

A body whose `X-Dify-Signature` does not match the secret is counted in `forged` and not
kept, so a test asserts both what arrived and that all of it was signed.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dify_serving.tasks.webhook import signature


class Hooks:
    def __init__(self, secret: bytes) -> None:
        self.received: list[dict[str, Any]] = []
        self.forged = 0
        hooks, lock = self, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    if self.headers.get("X-Dify-Signature") == signature(secret, body):
                        hooks.received.append(json.loads(body))
                    else:
                        hooks.forged += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
