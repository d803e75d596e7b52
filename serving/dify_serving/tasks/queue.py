"""The broker side of async tasks: Ray Serve's Celery adapter, told where the broker is.

Ray Serve 2.60's asynchronous inference (`ray.serve.task_consumer`) runs a Celery
worker inside each consumer replica (`CeleryTaskProcessorAdapter`: a thread pool, late
acknowledgement, requeue when a worker is lost). Its Taskiq adapter is still stubs in
2.60. Three things were missing, and `DifyCeleryAdapter` adds them:

- The broker URL is a secret (`DIFY_MIRROR_BROKER_URL`: RabbitMQ's carries a password),
  but the adapter takes it in `TaskProcessorConfig`, which travels with the deployment.
  Here the config names only the broker's kind; each process reads the URL itself.
- One machine needs a broker with no server. Kombu's SQLAlchemy transport on a SQLite
  file under the state folder is one, polled every 50 ms (`SqliteTransport`; kombu's
  default of 1 s would add up to a second to every task). It has no fanout, so Celery's
  broadcast `shutdown` (how the adapter stops its worker) never arrives: the adapter
  keeps its worker and stops it directly, which works for every broker.
- The adapter keeps a result per task in Celery's backend; the task rows (`store.py`)
  hold results here, so Celery's results are switched off.

The gateway publishes with `Publisher` (one thread: kombu producers are not thread-safe)
and fails fast when the broker is down, so a task is refused (503) rather than accepted
and lost. Delivery is at least once; `store.py` makes the effect exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport as SqlAlchemyTransport

from dify_serving.options import TaskOptions
from dify_serving.render import SHARED_QUEUE, model_queue
from dify_serving.security.secrets import read_secret

log = logging.getLogger(__name__)

__all__ = ["SHARED_QUEUE", "BrokerUnavailable", "Publisher", "adapter_for", "model_queue"]

#: The one Celery task name: its argument is a task id, the row says the rest.
RUN_TASK = "dify.run"
EMBEDDED_BROKER_FILE = "tasks-broker.db"


class SqliteTransport(SqlAlchemyTransport):
    """Kombu's SQLAlchemy transport, polling every 50 ms instead of every second."""

    polling_interval = 0.05


TRANSPORT_ALIASES.setdefault("dify-sqlite", f"{__name__}:SqliteTransport")


class BrokerUnavailable(RuntimeError):
    """The broker did not take a message; the text names no URL."""


def broker_url(home: str | Path, options: TaskOptions) -> str:
    """The broker of this process: the secret URL, or the state folder's SQLite file."""
    if options.broker == "embedded":
        return f"dify-sqlite+sqlite:///{(Path(home) / EMBEDDED_BROKER_FILE).resolve()}"
    url = read_secret("broker_url", Path(home))
    if not url:
        raise BrokerUnavailable(
            f"tasks use a {options.broker} broker but DIFY_MIRROR_BROKER_URL cannot be read: "
            "set it (or DIFY_MIRROR_BROKER_URL_FILE) where the gateway and consumers run"
        )
    return url


def celery_settings(options: TaskOptions) -> dict[str, Any]:
    """Celery settings both sides share (the adapter's own are kept as Ray Serve sets them)."""
    transport: dict[str, Any] = {}
    if options.broker == "embedded":
        # kombu hands these to SQLAlchemy's create_engine: a writer waits for the file's
        # lock (up to 30 s) instead of failing after sqlite3's default 5 s under load
        transport = {"connect_args": {"timeout": 30}}
    elif options.broker == "redis":
        # an unacknowledged task goes back to the queue after this long without an ack;
        # a consumer still running it keeps its row's lease, so the copy is a no-op
        transport = {"visibility_timeout": max(60, int(options.lease_s * 4))}
    return {
        "task_ignore_result": True,  # results live in the task rows
        # a dying consumer holds at most its running tasks; the embedded broker's consumer
        # refills its slots only a poll after an ack (640 one-second tasks at 64 at once:
        # 21.5 s with 1, 12.1 s with 2, Redis 11.2 s with 1), and what a killed consumer
        # had taken there is sent again from the task rows (`runner.py`)
        "worker_prefetch_multiplier": 2 if options.broker == "embedded" else 1,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "broker_transport_options": transport,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def _celery(url: str, options: TaskOptions, name: str) -> Any:
    from celery import Celery

    app = Celery(name, broker=url, backend="cache+memory://")
    app.conf.update(celery_settings(options))
    return app


class Publisher:
    """Sends task ids to their queue from one thread; `publish` raises BrokerUnavailable."""

    def __init__(self, home: str | Path, options: TaskOptions) -> None:
        self.options = options
        self._url = broker_url(home, options)
        self._app: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="publish")

    def _send(self, task_id: str, queue: str) -> None:
        if self._app is None:
            self._app = _celery(self._url, self.options, "dify-publisher")
        try:
            self._app.send_task(
                RUN_TASK,
                args=[task_id],
                queue=queue,
                task_id=task_id,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:  # kombu/amqp/redis errors: the URL stays out of the text
            log.warning("task broker refused a message: %s", type(exc).__name__)
            raise BrokerUnavailable("the task broker is unavailable") from None

    async def publish(self, task_id: str, queue: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._send, task_id, queue)

    def publish_sync(self, task_id: str, queue: str) -> None:
        self._pool.submit(self._send, task_id, queue).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def adapter_for(home: str, options: TaskOptions) -> type:
    """The adapter class a consumer's `TaskProcessorConfig` names, bound to this home."""
    from ray.serve.task_processor import CeleryTaskProcessorAdapter

    class DifyCeleryAdapter(CeleryTaskProcessorAdapter):  # type: ignore[misc]
        """Ray Serve's Celery adapter with the secret URL read here, results off, and a
        worker it stops itself (see the module docstring)."""

        _worker: Any = None

        def initialize(self, consumer_concurrency: int = 1) -> None:
            self._config.adapter_config.broker_url = broker_url(home, options)
            super().initialize(consumer_concurrency)
            self._app.conf.update(celery_settings(options))
            self._app.conf.update(worker_pool="threads", worker_concurrency=consumer_concurrency)

        def start_consumer(self, **kwargs: Any) -> None:
            from ray.serve import get_replica_context

            if self._worker_thread is not None and self._worker_thread.is_alive():
                return
            tag = get_replica_context().replica_tag
            self._worker_hostname = f"{self._config.queue_name}@{tag}"
            self._worker = self._app.Worker(
                hostname=self._worker_hostname,
                queues=[self._config.queue_name],
                pool="threads",
                concurrency=self._worker_concurrency_of(),
                loglevel="WARNING",
                without_mingle=True,
                without_gossip=True,
                redirect_stdouts=False,
            )
            self._worker_thread = threading.Thread(
                target=self._worker.start, name="celery-worker", daemon=True
            )
            self._worker_thread.start()

        def _worker_concurrency_of(self) -> int:
            return int(self._app.conf.worker_concurrency or 1)

        def stop_consumer(self, timeout: float = 10.0) -> None:
            if self._worker is None:
                return
            self._worker.stop(in_sighandler=False)
            if self._worker_thread is not None:
                self._worker_thread.join(timeout=timeout)
            self._worker = self._worker_thread = None

    return DifyCeleryAdapter
