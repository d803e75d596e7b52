"""The process that owns an OpenVINO GenAI pipeline (`openvino_textgen` starts it).

`ContinuousBatchingPipeline.step()` holds the GIL while it computes (tens of
milliseconds a step), so in the replica's process it froze the event loop and Ray's
threads between steps: requests reached the engine late and 64 concurrent HTTP clients
kept only ~20 sequences in its batch (800 tok/s over HTTP against 1,450 in-process).
Here the pipeline steps in a process of its own and the replica only passes messages.

Protocol (`multiprocessing.connection` over two pipes the parent hands over):
- in: `("add", id, token_ids, config, streaming)`, `("cancel", id)`, `("stop",)`;
- out: `("ready", None)` or `("failed", reason)` once, then after every step
  `("step", [(id, new_ids, status, finish_reason)], (running, waiting, cache_usage))`,
  status one of "running", "finished", "ignored", "cancelled", "failed". A streaming
  request's new ids come after every step; any other's all at once when it ends.
The process ends on "stop" or when the parent's end of a pipe closes (the replica died).
Light on purpose: it imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from multiprocessing.connection import Connection
from typing import Any

_STATUS = {"RUNNING": "running", "FINISHED": "finished", "IGNORED": "ignored"}


def _config(genai: Any, fields: dict[str, Any]) -> Any:
    config = genai.GenerationConfig()
    config.max_new_tokens = fields["max_new_tokens"]
    config.stop_token_ids = set(fields["stop_token_ids"])
    if fields.get("eos_token_id") is not None:
        config.eos_token_id = fields["eos_token_id"]
    if fields.get("temperature", 0.0) > 0:
        config.do_sample = True
        config.temperature = fields["temperature"]
        config.top_p = fields["top_p"]
        config.rng_seed = fields["seed"]
    return config


def _open(settings: dict[str, Any]) -> Any:
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    for key, value in settings["scheduler"].items():
        setattr(scheduler, key, value)
    return openvino_genai.ContinuousBatchingPipeline(
        settings["folder"], scheduler, "CPU", settings["properties"]
    )


def serve(inbox: Connection, outbox: Connection, settings: dict[str, Any]) -> None:
    import numpy as np
    import openvino
    import openvino_genai

    try:
        pipeline = _open(settings)
    except Exception as exc:  # the parent says why and runs torch
        outbox.send(("failed", f"{type(exc).__name__}: {exc}"[:500]))
        return
    outbox.send(("ready", None))
    handles: dict[int, Any] = {}
    held: dict[int, list[int]] = {}  # the ids of requests that do not stream, so far
    while True:
        wait = not handles and not pipeline.has_non_finished_requests()
        while wait or inbox.poll():
            message = inbox.recv()  # EOFError: the replica is gone
            wait = False
            if message[0] == "add":
                _, request_id, ids, fields, streaming = message
                tensor = openvino.Tensor(np.asarray([ids], dtype=np.int64))
                try:
                    config = _config(openvino_genai, fields)
                    handles[request_id] = pipeline.add_request(request_id, tensor, config)
                    if not streaming:
                        held[request_id] = []
                except Exception as exc:  # this request only
                    reason = f"the pipeline refused the request ({type(exc).__name__})"
                    outbox.send(("step", [(request_id, [], "failed", reason)], None))
            elif message[0] == "cancel":
                held.pop(message[1], None)
                handle = handles.pop(message[1], None)
                if handle is not None:
                    handle.cancel()
            elif message[0] == "stop":
                for handle in handles.values():
                    handle.cancel()
                if pipeline.has_non_finished_requests():
                    pipeline.step()  # frees the cancelled sequences' blocks
                return
        pipeline.step()
        updates = []
        for request_id, handle in list(handles.items()):
            new: list[int] = []
            finish: str | None = None
            if handle.can_read():
                for output in handle.read().values():
                    new.extend(int(i) for i in output.generated_ids)
                    finish = output.finish_reason.name
            status = _STATUS.get(handle.get_status().name, "cancelled")
            kept = held.get(request_id)
            if kept is not None:
                kept.extend(new)
                if status == "running":
                    continue
                new = held.pop(request_id)
            if status != "running":
                del handles[request_id]
            if new or status != "running":
                updates.append((request_id, new, status, finish))
        metrics = pipeline.get_metrics()
        running = min(len(handles), int(metrics.scheduled_requests))
        load = (running, len(handles) - running, float(metrics.cache_usage) / 100.0)
        outbox.send(("step", updates, load))


def main() -> None:
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    settings = json.loads(os.environ.pop("DIFY_OV_WORKER", "{}"))
    with contextlib.suppress(EOFError, BrokenPipeError):  # the replica went away
        serve(inbox, outbox, settings)


if __name__ == "__main__":
    main()
