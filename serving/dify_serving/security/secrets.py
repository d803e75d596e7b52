"""Secrets, read by the process that uses them and never passed on in clear.

A secret named `x` comes from, in order: the environment variable `DIFY_MIRROR_X`; the
file named by `DIFY_MIRROR_X_FILE` (a Kubernetes Secret mounted as a file, the way the
chart passes them, or `valueFrom.secretKeyRef` into the variable itself); the file
`$DIFY_MIRROR_HOME/secrets/x` (mode 0600), where `dify-mirror serve` leaves secrets it
was given for its own replicas. They are never written into the Serve config (the Ray
dashboard shows it), `desired-state.json`, a command line or a log line.

The pepper keys the HMAC of stored API-key secrets (a stolen key table is useless
without it) and, derived, the audit chain's HMAC. On one machine it is generated once
into the secrets folder; processes starting together agree on one because it is written
to a temporary file and then hard-linked into place, which either creates the complete
file or fails because another process already did: nobody ever reads it half-written.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

SECRETS_DIR = "secrets"
#: Secrets a process may read: never in options, the Serve config, argv or logs.
SECRET_NAMES = (
    "database_url",
    "redis_url",
    "broker_url",
    "key_pepper",
    "bootstrap_key",
    "audit_key",
    "webhook_secret",
)
#: `dm_<12 lowercase letters or digits>_<secret>`: the shape of every API key.
KEY_SHAPE = re.compile(r"dm_([a-z0-9]{12})_([A-Za-z0-9_-]{32,256})")
KEY_SHAPE_TEXT = "dm_<12 lowercase letters or digits>_<32+ characters>"


class SecretError(RuntimeError):
    """A secret is configured but unusable; the message names it, never its value."""


def secrets_dir(home: Path) -> Path:
    return Path(home) / SECRETS_DIR


def read_secret(name: str, home: Path) -> str | None:
    """The secret `name` from the environment, its `_FILE`, or the home's secrets folder."""
    if name not in SECRET_NAMES:
        raise ValueError(f"unknown secret {name!r}")
    variable = f"DIFY_MIRROR_{name.upper()}"
    value = os.environ.get(variable)
    if value:
        return value.strip()
    path_text = os.environ.get(f"{variable}_FILE")
    path = Path(path_text) if path_text else secrets_dir(home) / name
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        if path_text:
            raise SecretError(f"{variable}_FILE names a file that does not exist") from None
        return None
    except OSError as exc:
        raise SecretError(f"cannot read secret {name} ({exc.strerror})") from None
    return text or None


def write_private(path: Path, text: str, *, replace: bool = True) -> bool:
    """Write `text` to `path`, readable by the owner only; atomic, never seen half-written.

    With `replace=False` an existing file wins: returns False and leaves it as it is.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the file exists: the first writer wins
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_secret(home: Path, name: str, value: str) -> Path:
    """Leave a secret for this machine's replicas under `home/secrets` (mode 0600)."""
    path = secrets_dir(home) / name
    write_private(path, value + "\n")
    return path


def key_pepper(home: Path) -> bytes:
    """The pepper: configured, or generated once for this state folder.

    An empty one is refused, never used: HMACs keyed by nothing protect nothing, and a
    pepper generated in its place would silently orphan every stored key.
    """
    value = read_secret("key_pepper", home)
    if value:
        return value.encode()
    if os.environ.get("DIFY_MIRROR_KEY_PEPPER_FILE"):
        raise SecretError("DIFY_MIRROR_KEY_PEPPER_FILE names an empty file")
    path = secrets_dir(home) / "key_pepper"
    write_private(path, secrets.token_urlsafe(32) + "\n", replace=False)
    pepper = path.read_bytes().strip()
    if not pepper:
        raise SecretError(
            f"the key pepper file {path} is empty: restore it from a backup (keys created "
            "with the old pepper need it), or remove it to generate a new one"
        )
    return pepper


def bootstrap_key(home: Path) -> str | None:
    """The configured first admin key; SecretError when it has the wrong shape."""
    key = read_secret("bootstrap_key", home)
    if key is not None and not KEY_SHAPE.fullmatch(key):
        raise SecretError(f"DIFY_MIRROR_BOOTSTRAP_KEY must look like {KEY_SHAPE_TEXT}")
    return key


def audit_key(home: Path, pepper: bytes) -> bytes:
    """The audit chain's HMAC key: its own secret, else derived from the pepper."""
    value = read_secret("audit_key", home)
    if value:
        return value.encode()
    return hmac.new(pepper, b"dify-mirror audit chain", hashlib.sha256).digest()


@dataclass(frozen=True)
class Secrets:
    """The secrets one gateway process uses, read once at start (`repr` shows none)."""

    home: Path
    database_url: str | None = field(default=None, repr=False)
    redis_url: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, home: Path) -> Secrets:
        return cls(
            home=Path(home),
            database_url=read_secret("database_url", home),
            redis_url=read_secret("redis_url", home),
        )

    def require(self, database: bool, redis: bool) -> None:
        """Refuse to start when the options expect a secret this process cannot read."""
        for name, wanted, value in (
            ("DATABASE_URL", database, self.database_url),
            ("REDIS_URL", redis, self.redis_url),
        ):
            if wanted and not value:
                raise SecretError(
                    f"this gateway is configured with DIFY_MIRROR_{name} but cannot read it: "
                    f"set DIFY_MIRROR_{name} or DIFY_MIRROR_{name}_FILE in the environment of "
                    "the Ray nodes (a Kubernetes Secret), or in the local stack's home"
                )
