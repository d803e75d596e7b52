"""The processes of a running stack, measured from outside: resident memory and open file
descriptors of a process and all its descendants (`processes`), sampled over time
(`RssSampler`), and each one's growth against the soak's bound (`growth_rows`).

psutil comes as Ray ships it (ray/thirdparty_files): the project declares none of its own.
"""

from __future__ import annotations

import importlib
import re
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
#: A process may grow its RSS by max(RSS_BOUND_MIB MiB, RSS_BOUND_SHARE of its start) and
#: its open file descriptors by FD_BOUND.
RSS_BOUND_MIB, RSS_BOUND_SHARE, FD_BOUND = 64, 0.25, 32


def _psutil() -> Any:
    """psutil as Ray ships it: importing ray puts ray/thirdparty_files on sys.path (the
    project declares no psutil of its own)."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _label(proc: Any) -> str:
    """`ray::ServeReplica:gateway:Gateway`, `raylet`, `python3 dashboard.py`; a
    multiprocessing helper is named by its parent (`… resource tracker of …`)."""
    cmd = proc.cmdline()
    if not cmd:
        return str(proc.name())
    name = (Path(cmd[0]).name.split() or [str(proc.name())])[0]
    if not name.startswith("python"):  # a binary, or a title Ray set (ray::…, ray-dashboard-…)
        return re.sub(r"\.\w+$", "", name)  # `ray::ServeController.listen_for_change`
    if len(cmd) > 2 and cmd[1].endswith("dify-mirror") and cmd[2] == "serve":
        return "dify-mirror serve (driver)"
    if "-m" in cmd[1:-1]:
        return f"{name} -m {cmd[cmd.index('-m') + 1]}"
    script = next((Path(c).name for c in cmd[1:] if c.endswith(".py")), None)
    if script:
        return f"{name} {script}"
    text = " ".join(cmd)
    helpers = (("resource_tracker", "resource tracker"), ("forkserver", "forkserver"))
    kind = next((v for k, v in (*helpers, ("spawn_main", "child")) if k in text), None)
    if kind:
        parent = proc.parent()
        return f"multiprocessing {kind} of {_label(parent) if parent else '?'}"
    return " ".join(text.split())[:60]


def processes(root_pid: int) -> dict[int, dict[str, Any]]:
    """pid → label, RSS bytes and open FDs of `root_pid` and all its descendants."""
    psutil = _psutil()
    root = psutil.Process(root_pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            with proc.oneshot():
                rss, fds = proc.memory_info().rss, proc.num_fds()
                out[proc.pid] = {"process": _label(proc), "rss": rss, "fds": fds}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


class RssSampler(threading.Thread):
    """Each process's RSS every `every` seconds while the load runs: the peak, and the
    series (in the JSON) that tells memory that levels off from memory that climbs."""

    def __init__(self, root_pid: int, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.every = root_pid, every
        self.series: dict[int, list[tuple[float, int]]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.halt.wait(self.every):
            now = round(time.monotonic() - t0, 1)
            for pid, p in processes(self.root_pid).items():
                self.series.setdefault(pid, []).append((now, p["rss"]))

    def peaks(self) -> dict[int, int]:
        return {pid: max(rss for _, rss in points) for pid, points in self.series.items()}


def growth_rows(
    before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]], peaks: dict[int, int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per process: before, after, peak, growth and whether it is within the bound;
    and the failures, one sentence each."""
    rows, failures = [], []
    for pid in sorted(before.keys() | after.keys()):
        b, a = before.get(pid), after.get(pid)
        row: dict[str, Any] = {"pid": pid, "process": (a or b or {})["process"]}
        row |= {"rss_before": b and b["rss"], "rss_after": a and a["rss"]}
        row |= {"fds_before": b and b["fds"], "fds_after": a and a["fds"]}
        row["rss_peak"] = max(peaks.get(pid, 0), *(p["rss"] for p in (a, b) if p))
        if b and a:
            rss_bound = max(RSS_BOUND_MIB * MIB, RSS_BOUND_SHARE * b["rss"])
            row["rss_growth"], row["fds_growth"] = a["rss"] - b["rss"], a["fds"] - b["fds"]
            row["within_bound"] = row["rss_growth"] <= rss_bound and row["fds_growth"] <= FD_BOUND
            if not row["within_bound"]:
                failures.append(
                    f"{row['process']} (pid {pid}) grew {row['rss_growth'] / MIB:+.1f} MiB "
                    f"(bound {rss_bound / MIB:.0f}) and {row['fds_growth']:+d} FDs "
                    f"(bound {FD_BOUND})"
                )
        else:
            row["note"] = "started during the load" if a else "ended during the load"
        rows.append(row)
    return rows, failures
