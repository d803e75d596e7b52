"""A stand-in Ray dashboard on a real port, for gateways and operators without a Ray.

It keeps the Serve config it was given (`PUT /api/serve/applications/`), lists its apps
(`GET`) as DEPLOYING — never RUNNING, so nothing tries to call a replica, which would
start a Ray — and an app dropped from the config as DELETING for `linger_s` more seconds,
as Serve does while the app's replica stops.
"""

from __future__ import annotations

import json
import time
from typing import Any

from stub_http import QuietHandler, StubServer


class ServeDashboard(StubServer):
    """A stand-in Ray dashboard: PUT keeps the config, GET lists its apps as DEPLOYING
    (never RUNNING: nothing may try to call a replica, which would start a Ray) and an
    app dropped from it as DELETING for `linger_s` more seconds."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {"applications": []}
        self.linger_s = 0.0
        self.leaving: dict[str, float] = {}  # app → when Serve stops listing it
        self.puts = 0
        outer = self

        class Handler(QuietHandler):
            def do_PUT(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.put(body)
                self.reply(200, b"{}")

            def do_GET(self) -> None:
                self.reply(200, json.dumps({"applications": outer.applications()}).encode())

        super().__init__(Handler)

    def names(self) -> set[str]:
        return {app["name"] for app in self.config["applications"]}

    def put(self, config: dict[str, Any]) -> None:
        before = self.names()
        self.config, self.puts = config, self.puts + 1
        for name in before - self.names():
            self.leaving[name] = time.monotonic() + self.linger_s

    def applications(self) -> dict[str, Any]:
        apps = {name: {"status": "DEPLOYING", "deployments": {}} for name in self.names()}
        now = time.monotonic()
        for name, until in list(self.leaving.items()):
            if now < until and name not in apps:
                apps[name] = {"status": "DELETING", "deployments": {}}
        return apps
