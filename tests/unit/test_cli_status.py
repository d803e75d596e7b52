"""`dify-mirror status --watch / --wait`: the table it draws and the codes it exits with,
driven by a scripted status source and a recording console (no terminal, no stack)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from dify_serving.cli import WAIT_FAILED, WAIT_READY, WAIT_TIMEOUT, parser, watch

Statuses = dict[str, dict[str, Any]]


def model(phase: str, **fields: Any) -> dict[str, Any]:
    return {
        "phase": phase,
        "ready_replicas": 1 if phase == "Ready" else 0,
        "desired_replicas": 1,
        "message": phase,
        "load_progress": 1.0 if phase == "Ready" else 0.0,
        **fields,
    }


LOADING = model("Loading", load_progress=0.5, message="loading weights (120 MB of 240 MB)")


class Script:
    """Returns the scripted statuses one refresh after another (the last one after)."""

    def __init__(self, *frames: Statuses | None) -> None:
        self.frames = list(frames)
        self.reads = 0

    def __call__(self) -> Statuses | None:
        self.reads += 1
        return self.frames[min(self.reads, len(self.frames)) - 1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def run(source: Callable[[], Statuses | None], **kwargs: Any) -> tuple[int, str, Clock]:
    console = Console(record=True, width=160, force_terminal=False, color_system=None)
    clock = Clock()
    code = watch(source, console, clock=clock, sleep=clock.sleep, **kwargs)
    return code, console.export_text(), clock


def test_watch_draws_a_progress_bar_and_the_stage_of_a_loading_model() -> None:
    source = Script(
        {"llm": LOADING, "minilm": model("Ready")},
        {"llm": model("Ready"), "minilm": model("Ready")},
    )
    code, text, clock = run(source, wait=True, interval=0.5, show="each")
    assert code == WAIT_READY and source.reads == 2 and clock.slept == [0.5]
    first = text.split("NAME")[1]
    assert "loading weights (120 MB of 240 MB)" in first
    llm_row = next(line for line in first.splitlines() if line.startswith("llm"))
    assert "Loading" in llm_row and "━" in llm_row  # the bar, half drawn
    assert "0/1" in llm_row
    last = text.split("NAME")[-1]
    assert "━" not in last and "Ready" in last


def test_wait_exits_non_zero_when_a_model_ends_failed() -> None:
    source = Script(
        {"llm": LOADING, "bad": LOADING},
        {"llm": LOADING, "bad": model("Failed", message="OSError: no weights")},
    )
    code, text, _ = run(source, wait=True, show="end")
    assert code == WAIT_FAILED
    assert text.count("NAME") == 1  # --wait alone prints the last table only
    assert "OSError: no weights" in text


def test_wait_times_out_naming_what_is_not_ready() -> None:
    stuck = model(
        "Pending",
        reason="Unschedulable",
        message="unschedulable: a replica needs 1 CPU, the cluster has 0 CPU free",
    )
    source = Script({"llm": model("Ready"), "third": stuck})
    code, text, clock = run(source, wait=True, timeout=5, interval=2, show="each")
    assert code == WAIT_TIMEOUT
    assert clock.now >= 5 and source.reads == 4
    assert "Pending (Unschedulable)" in text and "needs 1 CPU" in text
    assert "timed out waiting for third" in text


def test_a_sleeping_model_counts_as_ready_and_shows_its_cold_start() -> None:
    asleep = model("Ready", ready_replicas=0, desired_replicas=0, scaled_to_zero=True)
    source = Script({"sleepy": {**asleep, "last_cold_start_s": 3.25}})
    code, text, _ = run(source, wait=True, show="each")
    assert code == WAIT_READY
    assert "asleep" in text and "last cold start 3.2 s" in text


def test_watch_without_wait_redraws_until_stopped() -> None:
    source = Script({"llm": LOADING}, {"llm": model("Ready")})
    stop = Clock()

    def sleep(seconds: float) -> None:
        stop.sleep(seconds)
        if len(stop.slept) == 3:
            raise KeyboardInterrupt

    console = Console(record=True, width=160, color_system=None)
    with pytest.raises(KeyboardInterrupt):
        watch(source, console, interval=1, clock=stop, sleep=sleep, show="live")
    assert source.reads == 3  # Ready did not end it: only --wait does


def test_no_stack_is_an_error() -> None:
    code, text, _ = run(Script(None), wait=True, show="end")
    assert code == 1 and "no running stack" in text


def test_status_flags_are_bounded(tmp_path: Path) -> None:
    args = parser().parse_args(["status", "--watch", "--interval", "0.5", "--wait"])
    assert args.watch and args.wait and args.interval == 0.5 and args.timeout is None
    for bad in (["--interval", "0"], ["--timeout", "-1"], ["--interval", "1e9"]):
        with pytest.raises(SystemExit):
            parser().parse_args(["status", *bad])
    out = subprocess.run(
        [sys.executable, "-m", "dify_serving.cli", "status", "--wait", "--timeout", "1"],
        capture_output=True,
        text=True,
        env={"DIFY_MIRROR_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 1 and "no running stack" in out.stdout, out
