"""Apply a rendered config to Ray Serve and read its status, over the dashboard REST API.

This is the one actuator, shared by the CLI, the gateway (on one machine) and the
operator: `PUT /api/serve/applications/` with the whole config (declarative, what KubeRay
uses) and `GET` for status. Ray ≥ 2.59 turns token auth on; the token goes in the
`Authorization` header.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

_PATH = "/api/serve/applications/"


def ray_auth_token() -> str | None:
    """The Ray auth token: `RAY_AUTH_TOKEN`, else the file Ray writes on first start."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


class RayUnavailable(RuntimeError):
    """The dashboard could not be reached or refused the request."""


def _base(url: str) -> str:
    return (url if "://" in url else f"http://{url}").rstrip("/")


def _headers(token: str | None) -> dict[str, str]:
    token = token if token is not None else ray_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        detail = response.text.strip().splitlines()[-1:] or [""]
        raise RayUnavailable(f"{what}: HTTP {response.status_code} {detail[0][:500]}")


class _Dashboard:
    def __init__(self, url: str) -> None:
        self.url = _base(url)

    def _unreachable(self, exc: httpx.HTTPError) -> RayUnavailable:
        return RayUnavailable(f"Ray dashboard {self.url} unreachable: {exc}")


class RayDashboard(_Dashboard):
    """Synchronous client (CLI, operator)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(url)
        self._client = httpx.Client(timeout=timeout, headers=_headers(token))

    def _send(self, method: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, self.url + _PATH, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response, what)
        return response

    def put_applications(self, config: dict[str, Any]) -> None:
        self._send("PUT", "applying the Serve config", json=config)

    def get_applications(self) -> dict[str, Any]:
        body: dict[str, Any] = self._send("GET", "reading Serve status").json()
        return body

    def close(self) -> None:
        self._client.close()


class AsyncRayDashboard(_Dashboard):
    """Asynchronous twin for the gateway's event loop."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(url)
        self._client = httpx.AsyncClient(timeout=timeout, headers=_headers(token))

    async def _send(self, method: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, self.url + _PATH, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response, what)
        return response

    async def put_applications(self, config: dict[str, Any]) -> None:
        await self._send("PUT", "applying the Serve config", json=config)

    async def get_applications(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self._send("GET", "reading Serve status")).json()
        return body
