"""The task worker: a Ray Serve task consumer that runs queued tasks with the data plane.

A transport like the REST routers: a task's request is what `/v1/inference` (or a batch,
or an upsert) would take, and it runs through the same data plane on a `GatewayState` of
its own, so a task answers exactly as the synchronous route would.

One `@task_consumer` deployment per queue (`render.task_apps`): the shared queue, and one
for each model whose spec asks for consumers of its own (`asyncInference`), autoscaled
on the queue's depth by Ray Serve's `AsyncInferenceAutoscalingPolicy` (`QueueDepthPolicy`
reads the broker URL, a secret, where the policy runs instead of from the config).

Celery runs handlers in its worker threads; each handler hands its task to this replica's
own event loop, where the data plane's async clients live, and waits. The loop also
renews the leases of running tasks, stops those cancelled by their owner (the model's
stream is cancelled, which frees its batch slot), and sends again tasks whose consumer
died (`tasks/store.py` explains why that is safe).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.async_inference_autoscaling_policy import AsyncInferenceAutoscalingPolicy
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import task_consumer, task_handler

from dify_serving.engines.protocol import Generator
from dify_serving.errors import DifyError
from dify_serving.gateway import cache_header
from dify_serving.gateway.dataplane import batch as batch_plane
from dify_serving.gateway.dataplane import data as data_plane
from dify_serving.gateway.dataplane import inference as inference_plane
from dify_serving.gateway.schemas import BatchRequest, InferenceRequest
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions
from dify_serving.security.secrets import read_secret
from dify_serving.specs import DifyModel
from dify_serving.specs import Task as ModelTask
from dify_serving.tasks.queue import RUN_TASK, SHARED_QUEUE, adapter_for
from dify_serving.tasks.runner import Claim, Outcome, TaskRunner

log = logging.getLogger(__name__)

#: Seconds between two writes of a streamed task's partial output.
PARTIAL_EVERY_S = 0.25


class TaskWorker:
    """One consumer replica: `run` is the Celery task; `TaskRunner` does the rest."""

    def __init__(self, gateway: dict[str, Any], queue: str) -> None:
        self.options = GatewayOptions.model_validate(gateway)
        self.state = GatewayState(self.options)
        store, publisher = self.state.task_backend()
        self.runner = TaskRunner(store, publisher, self.options.tasks, self.options.home, queue)
        self.runner.call(self._start()).result()
        self.runner.start(self.execute)

    async def _start(self) -> None:
        self.state.start()  # the status cache refreshes on the runner's loop

    @task_handler(name=RUN_TASK)
    def run(self, task_id: str) -> None:
        """Run one task to its end; returns (acknowledging the message) in every case but
        a failure of the task store itself, which Celery retries."""
        self.runner.run_blocking(task_id)

    async def execute(self, claim: Claim) -> Outcome:
        """A task's answer, as the synchronous route would give it."""
        if claim.task.kind == "inference":
            return await self._inference(claim)
        if claim.task.kind == "batch":
            return await self._batch(claim)
        if claim.task.kind == "upsert":
            return await self._upsert(claim)
        raise DifyError(422, "invalid_request", f"unknown task kind {claim.task.kind!r}")

    async def _inference(self, claim: Claim) -> Outcome:
        body = InferenceRequest.model_validate(claim.task.request)
        model = self._model(body.model)
        if model.spec.task != ModelTask.TEXT_GENERATION or not body.stream:
            # a cancelled task cancels its replica call, which ends its sequence there
            with cache_header.subject_use(claim.task.subject_id):
                result = await inference_plane.infer(self.state, model, body, claim.task.id)
            return Outcome(result.output, result.usage.model_dump())
        gen = inference_plane.generation_from(model, body)
        text: list[str] = []
        flushed = time.monotonic()
        usage = None
        stream = self.state.model_replicas.stream(model.target, Generator.generate_stream, gen)
        async for delta in stream:
            text.append(delta.delta)
            if delta.finish_reason:
                usage = inference_plane.usage(delta).model_dump()
            elif time.monotonic() - flushed >= PARTIAL_EVERY_S:
                flushed = time.monotonic()
                await claim.report(partial="".join(text))
        output = "".join(text)
        return Outcome(output, usage, partial=output)

    async def _batch(self, claim: Claim) -> Outcome:
        body = BatchRequest.model_validate(claim.task.request)
        model = self._model(body.model)
        answered = await batch_plane.infer_batch(self.state, model, body.requests, claim.task.id)
        results = answered.model_dump(mode="json")
        return Outcome(results["results"], results["usage"])

    async def _upsert(self, claim: Claim) -> Outcome:
        async def report(progress: dict[str, Any]) -> bool:
            return await claim.report(progress=progress)

        task = claim.task
        summary, progress = await data_plane.run_bulk(
            self.state, task.request, task.progress, report
        )
        # the documents are written: the row keeps no copy of their text
        kept = {"index": task.request["index"], "documents": len(task.request["documents"])}
        return Outcome(summary, progress=progress, request=kept)

    def _model(self, name: str | None) -> DifyModel:
        """The task's model, as the version that runs it (drawn now, or pinned)."""
        base, _, pinned = (name or "").partition("@")
        model = self.state.catalog.models().get(base)
        if model is None:
            raise DifyError(404, "model_not_found", f"model {name!r} is not loaded")
        return self.state.served(model, pinned or None)

    def __del__(self) -> None:
        if getattr(self, "runner", None) is not None:
            self.runner.close()
        if getattr(self, "state", None) is not None:
            self.state.close()


class QueueDepthPolicy(AsyncInferenceAutoscalingPolicy):  # type: ignore[misc]
    """Ray Serve's queue-depth policy, reading the broker URL (a secret) where it runs
    rather than from `policy_kwargs`, which the Serve config shows."""

    def __init__(self, home: str, queue_name: str, poll_interval_s: float = 10.0) -> None:
        url = read_secret("broker_url", Path(home))
        if not url:
            raise RuntimeError("queue-depth autoscaling needs DIFY_MIRROR_BROKER_URL")
        super().__init__(url, queue_name, poll_interval_s=poll_interval_s)


def build_task_app(args: dict[str, Any]) -> Any:
    """Serve application builder of one queue's consumers (`render.task_apps`)."""
    options = GatewayOptions.model_validate(args["gateway"])
    queue = args.get("queue") or SHARED_QUEUE
    config = TaskProcessorConfig(
        queue_name=queue,
        adapter=adapter_for(options.home, options.tasks),
        # a placeholder: the adapter reads the real URL (a secret) in the replica
        adapter_config=CeleryAdapterConfig(
            broker_url="secret://broker_url", backend_url="cache+memory://"
        ),
        max_retries=3,  # only a failing task store raises out of `run`
    )
    consumer = task_consumer(task_processor_config=config)(TaskWorker)
    deployment: Any = serve.deployment(name="TaskWorker")(consumer)
    return deployment.bind(gateway=options.model_dump(mode="json"), queue=queue)


__all__ = ["QueueDepthPolicy", "TaskWorker", "build_task_app"]
