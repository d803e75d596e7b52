"""`dify-mirror`: serve | apply | status | keys | audit."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from dify_serving import security_cli
from dify_serving.manifests import ManifestError, check_collections, load_file, merge_states
from dify_serving.settings import Settings


def _table(statuses: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'NAME':<24} {'PHASE':<9} {'READY':<6} MESSAGE"]
    for name, s in sorted(statuses.items()):
        ready = f"{s.get('ready_replicas', '-')}/{s.get('desired_replicas', '-')}"
        rows.append(f"{name:<24} {s['phase']:<9} {ready:<6} {s.get('message', '')[:80]}")
    return "\n".join(rows)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v}
    settings = Settings(**overrides)
    settings.serve_options()  # refuse bad combinations before anything starts
    state = load_file(args.file)
    check_collections(state, settings.qdrant_url, args.file)
    from dify_serving.local import LocalStack, ensure_home

    ensure_home(settings)
    stack = LocalStack(settings)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        url = stack.start()
        print(f"Ray dashboard {url}", flush=True)
        stored, _ = stack.store.load()
        merged, kept = merge_states(stored, state)
        if kept and args.replace:
            print(f"--replace: dropping {', '.join(kept)} (not in {args.file})", flush=True)
        elif kept:
            state = merged
            print(
                f"keeping {', '.join(kept)} from {settings.state_dir} (loaded over the API or "
                "with apply; --replace drops what the file does not name)",
                flush=True,
            )
        stack.apply(state)
        print(_table(stack.wait(timeout=args.timeout)), flush=True)
        scheme = "https" if settings.tls_certfile else "http"
        print(
            f"dify-mirror serving on {scheme}://{settings.host}:{settings.port} "
            f"(docs at /docs); Ctrl-C stops",
            flush=True,
        )
        if settings.grpc_port:
            grpc_scheme = "TLS" if settings.tls_certfile else "plaintext"
            print(
                f"gRPC DifyService on {settings.host}:{settings.grpc_port} ({grpc_scheme}, "
                "with reflection and health)",
                flush=True,
            )
        key_file = settings.state_dir / "bootstrap.key"
        if settings.auth and key_file.exists():
            print(f"the first admin API key is in {key_file} (Bearer)", flush=True)
        stopping.wait()
    finally:
        print("stopping…", flush=True)
        stack.stop()
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from dify_serving.catalog.files import LocalStateStore
    from dify_serving.control import RayDashboard
    from dify_serving.render import render_serve_config

    settings = Settings()
    incoming = load_file(args.file)
    store = LocalStateStore(settings.state_dir)
    _, options = store.load()
    if not options.gateway.dashboard_url:
        print(
            "no running stack found under DIFY_MIRROR_HOME; start one with "
            "`dify-mirror serve -f FILE`",
            file=sys.stderr,
        )
        return 1

    def change(state: Any, options: Any) -> None:
        state.models.update(incoming.models)
        state.indexes.update(incoming.indexes)
        check_collections(state, options.qdrant_url, args.file)  # before anything is written

    state, options = store.update(change)
    RayDashboard(options.gateway.dashboard_url or "").put_applications(
        render_serve_config(state, options)
    )
    print(f"applied {len(incoming.models)} model(s), {len(incoming.indexes)} index(es)")
    return 0


#: `status --wait` exit codes: all Ready, a model ended Failed, still waiting at the timeout.
WAIT_READY, WAIT_FAILED, WAIT_TIMEOUT = 0, 1, 124

Statuses = dict[str, dict[str, Any]]


def read_statuses() -> Statuses | None:
    """Models and indexes of the running local stack (None: no stack found).

    Phases come from Serve through the dashboard; while the gateway answers with the
    stored key (`DIFY_MIRROR_API_KEY`, else the bootstrap key), its view of the models is
    laid over them: load stages, unschedulable replicas at once, cold starts.
    """
    from dify_serving.catalog.files import LocalStateStore
    from dify_serving.control import RayDashboard
    from dify_serving.status import index_status, model_status

    settings = Settings()
    store = LocalStateStore(settings.state_dir)
    state, options = store.load()
    if not options.gateway.dashboard_url:
        return None
    apps = RayDashboard(options.gateway.dashboard_url).get_applications()["applications"] or {}
    statuses = {n: model_status(n, m.spec, apps) for n, m in state.models.items()}
    for name, index in state.indexes.items():
        statuses[f"index/{name}"] = index_status(name, index.spec, state.models, apps)
    for model in _gateway_models(settings, options.host, options.port):
        if model.get("name") in statuses:
            statuses[model["name"]].update(model)
    return statuses


def _gateway_models(settings: Settings, host: str, port: int) -> list[dict[str, Any]]:
    """`GET /v1/models/status` of the local gateway, or [] (no key, TLS, not answering)."""
    import os

    import httpx

    key = os.environ.get("DIFY_MIRROR_API_KEY")
    key_file = settings.state_dir / "bootstrap.key"
    if not key and key_file.is_file():
        try:
            key = key_file.read_text().strip()
        except OSError:
            key = None
    if not key or settings.tls_certfile:
        return []
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        r = httpx.get(
            f"http://{host}:{port}/v1/models/status",
            headers={"Authorization": f"Bearer {key}"},
            timeout=5,
        )
        models = r.json().get("models") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return []
    return [m for m in models or [] if isinstance(m, dict)]


def status_table(statuses: Statuses) -> Any:
    """A rich table: a progress bar (and the load stage) per model still loading."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    colours = {
        "Ready": "green",
        "Loading": "cyan",
        "Pending": "yellow",
        "Degraded": "magenta",
        "Failed": "red",
    }
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "PHASE", "READY", "PROGRESS", "MESSAGE"):
        table.add_column(column, no_wrap=column != "MESSAGE", overflow="fold")
    for name, s in sorted(statuses.items()):
        phase = str(s.get("phase", "Pending"))
        if s.get("reason"):
            phase = f"{phase} ({s['reason']})"
        ready = f"{s.get('ready_replicas', '-')}/{s.get('desired_replicas', '-')}"
        progress: Any = ""
        if s.get("phase") == "Loading":
            done = float(s.get("load_progress") or 0)
            progress = ProgressBar(total=1.0, completed=done, width=20)
        elif s.get("scaled_to_zero"):
            progress = "asleep"
        message = str(s.get("message") or "")
        if s.get("last_cold_start_s") is not None:
            message += f" (last cold start {s['last_cold_start_s']:.1f} s)"
        style = colours.get(str(s.get("phase")), "")
        table.add_row(name, Text(phase, style=style), ready, progress, message[:200])
    return table


def wait_outcome(statuses: Statuses) -> int | None:
    """`--wait`: READY when all are Ready, FAILED once a model is Failed, else None."""
    if any(s.get("phase") == "Failed" for s in statuses.values()):
        return WAIT_FAILED
    if statuses and all(s.get("phase") == "Ready" for s in statuses.values()):
        return WAIT_READY
    return None


def watch(
    source: Callable[[], Statuses | None],
    console: Any,
    interval: float = 2.0,
    wait: bool = False,
    timeout: float | None = None,
    show: str = "live",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw the table every `interval` s. With `wait`, return once all are Ready (0),
    a model is Failed (1) or `timeout` passed (124); without it, until interrupted.

    `show`: "live" redraws in place (a terminal), "each" prints every table (a pipe),
    "end" only the last one (`--wait` alone).
    """
    from contextlib import nullcontext

    from rich.live import Live

    deadline = None if timeout is None else clock() + timeout
    display = Live(console=console, auto_refresh=False) if show == "live" else nullcontext()
    statuses: Statuses | None = None
    with display as screen:
        while True:
            statuses = source()
            if statuses is None:
                console.print("no running stack found under DIFY_MIRROR_HOME", style="red")
                return 1
            table = status_table(statuses)
            if screen is not None:
                screen.update(table, refresh=True)
            elif show == "each":
                console.print(table)
            outcome = wait_outcome(statuses) if wait else None
            timed_out = deadline is not None and clock() >= deadline
            if show == "end" and (outcome is not None or timed_out):
                console.print(table)
            if outcome is not None:
                return outcome
            if timed_out:
                waiting = sorted(n for n, s in statuses.items() if s.get("phase") != "Ready")
                console.print(f"timed out waiting for {', '.join(waiting)}", style="yellow")
                return WAIT_TIMEOUT
            sleep(interval)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch or args.wait:
        from rich.console import Console

        console = Console()
        return watch(
            read_statuses,
            console,
            interval=args.interval,
            wait=args.wait,
            timeout=args.timeout,
            show=("live" if console.is_terminal else "each") if args.watch else "end",
        )
    statuses = read_statuses()
    if statuses is None:
        print("no running stack found under DIFY_MIRROR_HOME", file=sys.stderr)
        return 1
    print(json.dumps(statuses, indent=2) if args.json else _table(statuses))
    return 0


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text}: give seconds between 0.1 and 86400")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dify-mirror", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the stack locally from a manifests file")
    serve.add_argument("-f", "--file", required=True, help="YAML with DifyModel/DifyIndex")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--timeout", type=float, default=600, help="seconds to wait for Ready")
    serve.add_argument(
        "--replace",
        action="store_true",
        help="the file is the whole desired state: drop models and indexes it does not name",
    )
    serve.set_defaults(func=cmd_serve)
    apply = sub.add_parser("apply", help="change a running local stack")
    apply.add_argument("-f", "--file", required=True)
    apply.set_defaults(func=cmd_apply)
    status = sub.add_parser("status", help="show model and index status of the running stack")
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--watch", action="store_true", help="redraw the table (progress bars while loading)"
    )
    status.add_argument(
        "--interval", type=_seconds, default=2.0, help="seconds between redraws (default 2)"
    )
    status.add_argument(
        "--wait",
        action="store_true",
        help="exit 0 once all are Ready, 1 if a model ends Failed, 124 after --timeout",
    )
    status.add_argument("--timeout", type=_seconds, default=None, help="seconds --wait waits")
    status.set_defaults(func=cmd_status)
    security_cli.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a setting: one line each, naming the variable
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if where:
                message = f"DIFY_MIRROR_{where.upper()}: {message}"
            print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
