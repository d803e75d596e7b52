"""Webhooks: a finished task's result POSTed to the `callback_url` its request named.

The body is the task as `GET /v1/tasks/{id}` shows it, signed with
`X-Dify-Signature: sha256=<hex HMAC-SHA256(secret, body)>` (the scheme GitHub's webhooks
use), so a receiver can tell it came from this platform; the secret is
`DIFY_MIRROR_WEBHOOK_SECRET`, generated once under the state folder when unset.

A URL a client sends makes this server send requests, so where it may point is checked
twice: when the task is submitted (a clear 422) and again right before each delivery,
against what the name resolves to then (a name that later resolves inward is refused
too). Only http(s), and only public addresses unless `DIFY_MIRROR_WEBHOOK_ALLOW_PRIVATE`:
never loopback, link-local (cloud metadata at 169.254.169.254), private ranges (a
cluster's pod and service networks), multicast or reserved ones.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from dify_serving.security.secrets import read_secret, secrets_dir, write_private

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
#: Seconds between delivery attempts; the last one is the fifth.
BACKOFF_S = (1.0, 2.0, 4.0, 8.0)
TIMEOUT_S = 10.0


class CallbackRefused(ValueError):
    """A callback URL that may not be used; the message says why (no internal detail)."""


def check_url(url: str, allow_private: bool, resolve: bool = True) -> str:
    """`url` if the platform may POST to it, else CallbackRefused."""
    if len(url) > MAX_URL_CHARS:
        raise CallbackRefused(f"callback_url: longer than {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url: must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url: must not carry credentials")
    if allow_private or not resolve:
        return url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for address in _addresses(parts.hostname, port):
        if not address.is_global:
            raise CallbackRefused(
                "callback_url: points at a private, loopback or link-local address "
                "(allowed only with DIFY_MIRROR_WEBHOOK_ALLOW_PRIVATE)"
            )
    return url


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise CallbackRefused("callback_url: its host name does not resolve") from None
    out = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        out.append(address)
    return out


def webhook_secret(home: str | Path) -> bytes:
    """The signing secret: configured, or generated once for this state folder."""
    value = read_secret("webhook_secret", Path(home))
    if value:
        return value.encode()
    path = secrets_dir(Path(home)) / "webhook_secret"
    write_private(path, secrets.token_urlsafe(32) + "\n", replace=False)
    return path.read_bytes().strip()


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def deliver(
    url: str,
    body: bytes,
    secret: bytes,
    allow_private: bool,
    sleep: object = time.sleep,
) -> bool:
    """POST `body` until a 2xx answer, with back-off; False after the last attempt."""
    import httpx

    headers = {
        "Content-Type": "application/json",
        "X-Dify-Signature": signature(secret, body),
        "User-Agent": "dify-mirror-webhook/1",
    }
    for attempt in range(len(BACKOFF_S) + 1):
        try:
            check_url(url, allow_private)
            response = httpx.post(
                url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False
            )
            if 200 <= response.status_code < 300:
                return True
            outcome = f"status {response.status_code}"
        except CallbackRefused as exc:
            log.warning("webhook not sent: %s", exc)
            return False
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        if attempt < len(BACKOFF_S):
            log.info("webhook attempt %d failed (%s); retrying", attempt + 1, outcome)
            sleep(BACKOFF_S[attempt])  # type: ignore[operator]
    log.warning("webhook gave up after %d attempts", len(BACKOFF_S) + 1)
    return False
