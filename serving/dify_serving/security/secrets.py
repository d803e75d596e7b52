"""Secrets the gateway and the CLI share, from the environment or the state folder.

The pepper keys the HMAC of stored API-key secrets: a stolen key table is useless
without it. It comes from `DIFY_MIRROR_KEY_PEPPER` (a Kubernetes Secret in a cluster)
or, on one machine, from `$DIFY_MIRROR_HOME/pepper`, created once with mode 0600 (an
exclusive create, so processes starting together agree on one). Secrets never travel in
the Serve config, which the Ray dashboard shows to anyone with its token.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def key_pepper(home: Path) -> bytes:
    value = os.environ.get("DIFY_MIRROR_KEY_PEPPER")
    if value:
        return value.encode()
    path = home / "pepper"
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return path.read_bytes().strip()


def bootstrap_key() -> str | None:
    return os.environ.get("DIFY_MIRROR_BOOTSTRAP_KEY") or None
