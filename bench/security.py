"""The guard's cost: a cheap authenticated route with auth + rate limit + audit on vs off.

Two gateway processes (the same FastAPI app the Serve replica builds, on uvicorn like the
direct ingress), one with security on and one with it off, take turns under the same
closed-loop load on `GET /v1/models`. With security on the key has a requests/minute
limit (so the limiter runs on every request) and every request is audited (SQLite, WAL,
batched). Ray is not involved: the route answers from the gateway's own state, so the
figure isolates what the guard adds (`bench/onoff.py` runs the two and takes turns).

`python -m bench.security serve HOME PORT on|off` runs one such gateway.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench import onoff


def serve(home: str, port: int, on: bool) -> None:
    import uvicorn

    from dify_serving.gateway.app import create_app
    from dify_serving.gateway.state import GatewayState
    from dify_serving.options import GatewayOptions, SecurityOptions

    options = GatewayOptions(home=home, security=SecurityOptions(enabled=on))
    app = create_app(GatewayState(options))
    uvicorn.run(
        app, host="127.0.0.1", port=port, access_log=False, log_level="warning", proxy_headers=False
    )


def security_rows(free_port: int, other_port: int) -> list[tuple[str, str, str, str]]:
    from dify_serving.security.db import database_url
    from dify_serving.security.keys import KeyStore
    from dify_serving.security.secrets import key_pepper

    home = Path(tempfile.mkdtemp(prefix="dify-bench-sec-"))
    keys = KeyStore(database_url(home, None, "keys"), key_pepper(home))
    key = keys.create("bench", ["inference"], rate_limit={"requests_per_minute": 1_000_000_000}).key
    keys.close()
    env = {**os.environ, "DIFY_MIRROR_KEY_PEPPER": key_pepper(home).decode()}
    auth = {"Authorization": f"Bearer {key}"}
    on = onoff.start("bench.security", home, free_port, True, env, auth)
    off = onoff.start("bench.security", home / "off", other_port, False, env, {})
    on_rate, off_rate = onoff.medians(on, off)
    return [
        (
            f"security: GET /v1/models req/s, concurrency {onoff.CONCURRENCY}, "
            "auth + rate limit + audit on",
            f"{on_rate:.0f}",
            f"the same route with them off {off_rate:.0f}",
            f"{on_rate / off_rate:.2f}×",
        )
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "on")
