"""What every engine shares: device and precision checks, pinned threads, `info()`.

An engine subclasses `Engine` and implements the Protocols of its capabilities
(`protocol.py`); `registry.py` says which engine serves which task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import shutil
import tempfile
from abc import ABC
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from dify_serving.engines.protocol import EngineError
from dify_serving.specs import DifyModelSpec, Precision, Task

#: Characters of text tokenized (or cleaned) on the event loop; more go to a thread. A
#: megabyte takes a tokenizer a few hundred milliseconds, which would stall every other
#: request on the replica; a small text costs less than the thread hop would.
INLINE_CHARS = 16 * 1024
_T = TypeVar("_T")


async def inline_or_thread(chars: int, work: Callable[..., _T], *args: Any) -> _T:
    """`work(*args)` on the loop when it handles at most INLINE_CHARS characters, else in a
    thread, so one large request cannot stall the others."""
    if chars <= INLINE_CHARS:
        return work(*args)
    return await asyncio.to_thread(work, *args)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 bf16 or AMX). Elsewhere bf16 is
    emulated: torch ran a 58 M Llama at 0.44× its fp32 speed on an AVX2-only CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: assume not, and say so in the status
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def effective_precision(spec: DifyModelSpec) -> tuple[Precision, str | None]:
    """The precision a replica runs and, when it differs from the spec's, why: bf16 on a
    CPU without bf16 runs fp32 (faster there), never silently slow."""
    precision = Precision(spec.precision)
    if precision == Precision.BF16 and not spec.uses_cuda and not cpu_has_bf16():
        return Precision.FP32, "bf16 asked, but this CPU has no bf16 support: running fp32"
    return precision, None


def _torch_setup(spec: DifyModelSpec) -> tuple[str, Any]:
    """Check device and precision, pin math threads; return (device, torch dtype)."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, round(spec.resources.cpus)))
    torch.set_num_threads(threads)
    device = spec.device
    if spec.uses_cuda and not torch.cuda.is_available():
        raise EngineError(503, "no_gpu", f"device {device} requested but CUDA is not available")
    if spec.precision == "fp16" and device == "cpu":
        raise EngineError(422, "unsupported_precision", "fp16 needs a GPU; on CPU use bf16 or fp32")
    dtype = {  # int8 quantizes at load in CTranslate2; torch's side of it is fp32
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "int8": torch.float32,
    }[str(effective_precision(spec)[0])]
    return device, dtype


@contextlib.contextmanager
def written_in_place(folder: Path, marker: str) -> Iterator[Path]:
    """A scratch folder beside `folder` to convert a model into, renamed to `folder` when
    the block ends: a replica that dies mid-conversion leaves nothing half-written, and
    one that loses the race to another keeps the winner's (`marker` is its file)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield scratch
        try:
            os.replace(scratch, folder)
        except OSError:
            if not (folder / marker).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class ConversionFailed(Exception):
    """A fast engine could not convert the model: the registry runs torch and says why."""


class Engine(ABC):
    """A loaded model. Subclasses implement the capability Protocols of their task."""

    task: Task

    def __init__(
        self, name: str, spec: DifyModelSpec, path: str, *, home: Path | None = None
    ) -> None:
        self.name = name
        self.spec = spec
        self.path = path
        #: Where converted models are cached (`$DIFY_MIRROR_HOME`); None: a temp folder.
        self.home = home if home is not None else Path(tempfile.gettempdir()) / "dify-mirror"
        self.device, self.dtype = _torch_setup(spec)
        self.precision, note = effective_precision(spec)
        self.model: Any = None
        #: Why what runs is not what the spec asked for (a fallback), for the status.
        self.runtime_note: str | None = note

    async def start(self) -> None:
        """Warm up (first calls are slow); called once after loading."""

    async def stop(self, reason: str) -> None:
        """End in-flight work with `reason` (unload)."""

    # metric hooks: the replica's telemetry replaces `on_batch` and reads `queue_state`
    def on_batch(self, rows: int) -> None:
        """A batch of `rows` began (engines that batch call it; a no-op until watched)."""

    def queue_state(self) -> dict[str, float] | None:
        """What only the engine knows of its load, read at push time from another thread:
        `running` and `waiting` requests, `kv_cache_usage` (0-1); None: nothing more
        than the replica counts itself (calls in flight, all taken as running)."""
        return None

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0

    def healthy(self) -> bool:
        """False when the engine can no longer serve (the replica's health check fails
        and Serve replaces the replica)."""
        return True

    def info(self) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {
            "name": self.name,
            "task": str(self.task),
            "model_id": self.spec.model_id,
            "device": self.device,
            "precision": str(self.precision),
            "engine": "torch",
            "parameters": self.parameters(),
            "resident_memory_bytes": rss_bytes(),
            "threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }
        if self.runtime_note:
            info["engine_note"] = self.runtime_note
        if torch.cuda.is_available():
            info["gpus"] = _gpu_info()
        return info


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of this process, or of `pid` (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux, or gone
        if pid != "self":
            return 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gpu_info() -> list[dict[str, Any]]:
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        entry: dict[str, Any] = {
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "memory_used_bytes": total - free,
            "memory_total_bytes": total,
        }
        try:
            entry["utilization_percent"] = torch.cuda.utilization(i)
        except Exception:  # pynvml missing
            entry["utilization_percent"] = None
        out.append(entry)
    return out
