"""HTML cleaning for `/v1/data/clean`, away from the gateway's event loop and its GIL.

A thread is enough for small texts. A few megabytes of HTML are not: lxml joins the
text of a parsed tree and frees the tree in single C calls that hold the GIL for 80-90
ms each (3 MB, measured here), and the event loop waits for the GIL like any thread, so
every other request on the replica would wait too. Texts over `PROCESS_CHARS` are
cleaned in a child process instead (spawned on first use, then reused), at the cost of
copying the text there and back (a few milliseconds per megabyte). The child exits
when the gateway does, however the gateway ends (a replica is often killed, not closed).
The index replicas clean in a thread: they serve no latency-sensitive routes of their own.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from dify_serving.gateway.errors import ApiError
from dify_serving.knowledge.cleaning import clean_text
from dify_serving.specs import Cleaning

log = logging.getLogger(__name__)

#: Characters cleaned in a thread; longer texts go to the child process.
PROCESS_CHARS = 256 * 1024
#: Large texts waiting for (or in) the child process; more are told to retry.
MAX_WAITING = 8


class Cleaner:
    """Cleans texts off the event loop: small ones in a thread, large ones in a process."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._waiting = 0

    async def clean(self, text: str, rules: Cleaning) -> str:
        if len(text) <= PROCESS_CHARS:
            return await asyncio.to_thread(clean_text, text, rules)
        if self._waiting >= MAX_WAITING:
            raise ApiError(
                503,
                "overloaded",
                f"{self._waiting} large texts are being cleaned; retry shortly",
                headers={"Retry-After": "1"},
            )
        self._waiting += 1
        if self._pool is None:  # spawn: a fork of a threaded server may inherit held locks
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=context,
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
        pool = self._pool
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(pool, clean_text, text, rules)
        except BrokenProcessPool:
            log.warning("the cleaning process stopped; starting a new one on the next call")
            if self._pool is pool:
                self._pool = None
            raise ApiError(
                503,
                "cleaner_unavailable",
                "the cleaning process stopped; retry shortly",
                headers={"Retry-After": "1"},
            ) from None
        finally:
            self._waiting -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _exit_with_parent(parent: int) -> None:
    """In the child: leave as soon as the gateway process is gone (checked every second)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
