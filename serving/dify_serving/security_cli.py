"""`dify-mirror keys create|list|revoke` and `dify-mirror audit verify [--json]|purge`.

They work on the key and audit databases directly (the SQLite files under
`DIFY_MIRROR_HOME`, or `DIFY_MIRROR_DATABASE_URL`), so an operator can mint the first
keys or check the trail with the gateway down. What they change is audited like an API
call (route `cli keys revoke`, ...), so the trail has no hole for the command line.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dify_serving.settings import Settings

if TYPE_CHECKING:  # the commands import their stores when they run, not at CLI start
    from dify_serving.security.audit import AuditTrail
    from dify_serving.security.keys import KeyStore


def _stores(settings: Settings) -> tuple[KeyStore, AuditTrail]:
    from dify_serving.security.db import database_url
    from dify_serving.security.keys import KeyStore
    from dify_serving.security.secrets import key_pepper

    home = settings.state_dir
    home.mkdir(parents=True, exist_ok=True)
    configured = settings.secret("database_url")
    keys = KeyStore(database_url(home, configured, "keys"), key_pepper(home))
    return keys, _audit_log(settings)


def _audit_log(settings: Settings, *, writes: bool = True) -> AuditTrail:
    """The trail with the home's chain key and checkpoint places, as the gateway opens it.

    A log that `writes` checkpoints the head when it closes, so rows written here are
    covered too; `verify` only reads and leaves every checkpoint as it found it.
    """
    from dify_serving.security.audit import AuditLog

    home = settings.state_dir
    home.mkdir(parents=True, exist_ok=True)
    return AuditLog.from_settings_like(
        settings.secret("database_url"),
        home,
        redis_url=settings.secret("redis_url"),
        configmap=settings.audit_configmap,
        retention_days=settings.audit_retention_days,
        allow_short_retention=settings.audit_allow_short_retention,
        checkpoint_s=settings.audit_checkpoint_s if writes else None,
    )


def _audit(
    audit: AuditTrail, route: str, status: int, detail: str, key_id: str | None = None
) -> None:
    from dify_serving.security.audit import AuditEntry

    audit.record(
        AuditEntry(
            time=time.time(),
            request_id=uuid.uuid4().hex,
            key_id=key_id,
            client_ip=None,
            method="CLI",
            route=route,
            status=status,
            latency_ms=0.0,
            detail=f"{detail} (by {getpass.getuser()}@{socket.gethostname()})",
        )
    )


def _patterns(text: str | None) -> list[str] | None:
    """`support-*,demo-llm` → a list; None (every name) when the option is not given."""
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


def cmd_keys(args: argparse.Namespace) -> int:
    keys, audit = _stores(Settings())
    try:
        if args.action == "create":
            rate = {
                k: v
                for k, v in (("requests_per_minute", args.rpm), ("tokens_per_minute", args.tpm))
                if v
            }
            expires = datetime.fromisoformat(args.expires) if args.expires else None
            if expires is not None and expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)
            try:
                created = keys.create(
                    args.name,
                    [s.strip() for s in args.scopes.split(",") if s.strip()],
                    expires_at=expires,
                    ip_allowlist=args.ip or [],
                    rate_limit=rate or None,
                    totp=args.totp,
                    models=_patterns(args.models),
                    indexes=_patterns(args.indexes),
                )
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            _audit(audit, "cli keys create", 201, f"created key {created.id}", created.id)
            out: dict[str, str | None] = {"id": created.id, "key": created.key}
            if args.totp:
                out |= {"totp_secret": created.totp_secret, "totp_uri": created.totp_uri}
            print(json.dumps(out, indent=2))
            print("the key is shown once: store it now", file=sys.stderr)
        elif args.action == "list":
            for r in keys.list():
                state = "revoked" if r.revoked else "active"
                scopes = ",".join(sorted(r.scopes))
                confined = "".join(
                    f"  {kind}={','.join(names)}"
                    for kind, names in (("models", r.models), ("indexes", r.indexes))
                    if names is not None
                )
                print(f"{r.id}  {state:8} {scopes:40} {r.name}{confined}")
        else:
            found = keys.revoke(args.id)
            _audit(audit, "cli keys revoke", 200 if found else 404, f"revoke {args.id}", args.id)
            if not found:
                print(f"error: no key {args.id}", file=sys.stderr)
                return 1
            print(f"revoked {args.id}")
        return 0
    finally:
        audit.close()
        keys.close()


def cmd_audit(args: argparse.Namespace) -> int:
    audit = _audit_log(Settings(), writes=args.action != "verify")
    try:
        if args.action == "verify":
            report = audit.verify()
            print(json.dumps(report.as_dict()) if args.json else report.summary())
            return 0 if report.ok else 1
        removed = audit.purge()
        print(f"purged {removed} rows older than the retention period")
        return 0
    finally:
        audit.close()


def add_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key (its secret is printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated, e.g. inference,admin")
    create.add_argument("--expires", help="ISO time")
    create.add_argument("--ip", action="append", help="allowed CIDR (repeat)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="generated tokens per minute")
    create.add_argument("--totp", action="store_true", help="give the key a second factor")
    create.add_argument("--models", help="model name patterns, comma-separated (support-*)")
    create.add_argument("--indexes", help="index name patterns, comma-separated")
    actions.add_parser("list", help="list keys (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key")
    revoke.add_argument("id")
    keys.set_defaults(func=cmd_keys)
    audit = sub.add_parser(
        "audit", help="verify the audit trail (chain and checkpoints; exit 1 if broken), or purge"
    )
    audit.add_argument("action", choices=["verify", "purge"])
    audit.add_argument("--json", action="store_true", help="verify: print one JSON object")
    audit.set_defaults(func=cmd_audit)
