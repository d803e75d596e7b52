"""Swagger UI served by the gateway itself, and an OpenAPI document that says how to log in.

The guard is a middleware, not a FastAPI dependency, so FastAPI cannot see it. The
bearer scheme and each operation's requirements are therefore added from the policy
table (`gateway/policy.py`): the rule the guard enforces is the rule the document
states, and a second factor header is offered where the rule is sensitive, so Swagger
UI's "Authorize" and "Try it out" work.

FastAPI's `/docs` page loads Swagger UI from a CDN; a gateway in a cluster without
outside access would show a blank page. The page here loads the same Swagger UI 5
files from the `swagger-ui-py` package, served by the gateway under `/docs/assets/`.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.policy import rule_for

DOCS = "/docs"
ASSETS = f"{DOCS}/assets"
#: The only files `/docs/assets/` serves, with their media types.
_ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}

BEARER = "bearer"
OTP_HEADER = "X-Dify-OTP"
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
_OTP_PARAMETER = {
    "name": OTP_HEADER,
    "in": "header",
    "required": False,
    "description": "Current 6-digit one-time code; needed on this route by keys that "
    "have a second factor.",
    "schema": {"type": "string", "pattern": "^[0-9]{6}$"},
}


def serve_docs(app: FastAPI) -> None:
    """`GET /docs`: Swagger UI from this gateway's own assets (no CDN)."""

    @app.get(DOCS, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )

    @app.get(ASSETS + "/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        media = _ASSET_TYPES.get(name)
        if media is None:  # a fixed list: no path from the request reaches the disk
            raise ApiError(404, "not_found", f"no asset {name[:64]!r}")
        return FileResponse(_assets() / name, media_type=media, headers=_CACHE)


_CACHE = {"Cache-Control": "public, max-age=86400"}


@cache
def _assets() -> Path:
    spec = importlib.util.find_spec("swagger_ui")  # its files only; never imported
    if spec is None or not spec.submodule_search_locations:
        raise ApiError(
            503, "unavailable", "Swagger UI is not installed (pip package swagger-ui-py)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def declare_security(app: FastAPI) -> None:
    """Make `app.openapi()` declare the bearer scheme and the one-time-code header."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI caches it; securing it twice changes nothing
        if BEARER not in schema.get("components", {}).get("securitySchemes", {}):
            secure(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def secure(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the scheme, and per operation the key (and OTP header) its policy rule asks."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "dm_<12 id characters>_<secret>",
        "description": "An API key (`dify-mirror keys create`, or the bootstrap key).",
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in _METHODS:
                continue
            rule = rule_for(method.upper(), path)
            if rule.public:
                continue
            operation["security"] = [{BEARER: []}]
            if rule.sensitive:
                parameters = operation.setdefault("parameters", [])
                if not any(p.get("name") == OTP_HEADER for p in parameters):
                    parameters.append(dict(_OTP_PARAMETER))
    return schema
