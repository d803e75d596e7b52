"""A separate local Ray cluster for tests that drive Serve only through the dashboard.

`python tests/ray_cluster.py DASHBOARD_PORT` starts Ray, prints the dashboard URL, and
runs until SIGTERM or stdin closes, then shuts Serve and Ray down.
"""

from __future__ import annotations

import signal
import sys
import threading

import ray
from ray import serve


def main() -> None:
    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=int(sys.argv[1]),
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=False,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(f"http://{ctx.dashboard_url}", flush=True)
    stop.wait()
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
