"""Apply a rendered config to Ray Serve and read its status, over the dashboard REST API.

This is the one actuator, shared by the CLI, the gateway (on one machine) and the
operator: `PUT /api/serve/applications/` with the whole config (declarative, what KubeRay
uses) and `GET` for status. Ray ≥ 2.59 turns token auth on; the token goes in the
`Authorization` header.
"""

from __future__ import annotations

from typing import Any

import httpx

from dify_serving.settings import ray_auth_token

_PATH = "/api/serve/applications/"


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


class RayDashboard:
    """Synchronous client (CLI, operator)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = _base(url)
        self._client = httpx.Client(timeout=timeout, headers=_headers(token))

    def put_applications(self, config: dict[str, Any]) -> None:
        try:
            response = self._client.put(self.url + _PATH, json=config)
        except httpx.HTTPError as exc:
            raise RayUnavailable(f"Ray dashboard {self.url} unreachable: {exc}") from exc
        _raise_for(response, "applying the Serve config")

    def get_applications(self) -> dict[str, Any]:
        try:
            response = self._client.get(self.url + _PATH)
        except httpx.HTTPError as exc:
            raise RayUnavailable(f"Ray dashboard {self.url} unreachable: {exc}") from exc
        _raise_for(response, "reading Serve status")
        body: dict[str, Any] = response.json()
        return body

    def close(self) -> None:
        self._client.close()


class AsyncRayDashboard:
    """Asynchronous twin for the gateway's event loop."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = _base(url)
        self._client = httpx.AsyncClient(timeout=timeout, headers=_headers(token))

    async def put_applications(self, config: dict[str, Any]) -> None:
        try:
            response = await self._client.put(self.url + _PATH, json=config)
        except httpx.HTTPError as exc:
            raise RayUnavailable(f"Ray dashboard {self.url} unreachable: {exc}") from exc
        _raise_for(response, "applying the Serve config")

    async def get_applications(self) -> dict[str, Any]:
        try:
            response = await self._client.get(self.url + _PATH)
        except httpx.HTTPError as exc:
            raise RayUnavailable(f"Ray dashboard {self.url} unreachable: {exc}") from exc
        _raise_for(response, "reading Serve status")
        body: dict[str, Any] = response.json()
        return body
