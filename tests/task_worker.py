"""A task consumer without Ray: Ray Serve's Celery adapter (ours) and `TaskRunner`.

`python tests/task_worker.py CONFIG_JSON` consumes one queue until killed. Its tasks
sleep `request["sleep"]` seconds and answer `request["value"] * 2`; each run that gets
to its end appends `<task id>` to `runs.log` in the home, so a test can count runs.
`tests/services/test_task_backends.py` starts it against every broker.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def main(config: dict[str, Any]) -> None:
    import ray.serve
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

    from dify_serving.options import TaskOptions
    from dify_serving.tasks.queue import RUN_TASK, Publisher, adapter_for
    from dify_serving.tasks.runner import Claim, Outcome, TaskRunner
    from dify_serving.tasks.store import TaskStore

    home = config["home"]
    options = TaskOptions.model_validate(config["options"])
    store = TaskStore(config["store_url"], options.ttl_s)
    runner = TaskRunner(store, Publisher(home, options), options, home, config["queue"])
    runs = Path(home) / "runs.log"
    lock = threading.Lock()

    async def execute(claim: Claim) -> Outcome:
        request = claim.task.request
        await asyncio.sleep(float(request.get("sleep", 0)))
        if request.get("fail"):
            from dify_serving.errors import DifyError

            raise DifyError(422, "bad_value", "this task fails on purpose")
        with lock, runs.open("a") as out:
            out.write(claim.task.id + "\n")
        return Outcome(output=request["value"] * 2, usage={"units": 1})

    runner.start(execute)
    ray.serve.get_replica_context = lambda: SimpleNamespace(replica_tag=f"test-{config['name']}")
    adapter_class = adapter_for(home, options)
    adapter = adapter_class(
        TaskProcessorConfig(
            queue_name=config["queue"],
            adapter=adapter_class,
            adapter_config=CeleryAdapterConfig(
                broker_url="secret://", backend_url="cache+memory://"
            ),
            max_retries=0,
        )
    )
    adapter.initialize(int(config.get("concurrency", 4)))
    adapter.register_task_handle(runner.run_blocking, RUN_TASK)
    adapter.start_consumer()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    adapter.stop_consumer(timeout=5)
    runner.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
