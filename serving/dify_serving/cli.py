"""`dify-mirror`: serve | apply | status | keys | audit."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
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


def cmd_status(args: argparse.Namespace) -> int:
    from dify_serving.catalog.files import LocalStateStore
    from dify_serving.control import RayDashboard
    from dify_serving.status import index_status, model_status

    store = LocalStateStore(Settings().state_dir)
    state, options = store.load()
    if not options.gateway.dashboard_url:
        print("no running stack found under DIFY_MIRROR_HOME", file=sys.stderr)
        return 1
    apps = RayDashboard(options.gateway.dashboard_url).get_applications()["applications"] or {}
    statuses = {n: model_status(n, m.spec, apps) for n, m in state.models.items()}
    for name, index in state.indexes.items():
        statuses[f"index/{name}"] = index_status(name, index.spec, state.models, apps)
    print(json.dumps(statuses, indent=2) if args.json else _table(statuses))
    return 0


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
