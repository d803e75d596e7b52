"""Swagger UI served by the gateway itself, and an OpenAPI document that says how to log in.

The guard is a middleware, not a FastAPI dependency, so FastAPI cannot see it. The
bearer scheme and each operation's requirements are therefore added from the policy
table (`gateway/policy.py`): the rule the guard enforces is the rule the document
states, and a second factor header is offered where the rule is sensitive, so Swagger
UI's "Authorize" and "Try it out" work; `X-Dify-Subject` (which the guard checks too) is
offered where a body may carry text about a data subject.

FastAPI's `/docs` page loads Swagger UI from a CDN; a gateway in a cluster without
outside access would show a blank page. The page here loads the same Swagger UI 5
files from the `swagger-ui-py` package, served by the gateway under `/docs/assets/`.
"""

from __future__ import annotations

import importlib.util
import json
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


SUBJECT_HEADER = "X-Dify-Subject"
_SUBJECT_PARAMETER = {
    "name": SUBJECT_HEADER,
    "in": "header",
    "required": False,
    "description": "The data subject this request is about. Where the audit keeps request "
    "text, it is sealed under the subject's key, which erasing the subject destroys "
    "(as for documents with a subject_id).",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:@+-]{1,128}$"},
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


def complete(app: FastAPI, secured: bool) -> None:
    """Make `app.openapi()` declare what FastAPI cannot see: the error body of every
    operation, the links between operations and, when `secured`, the bearer scheme and
    the one-time-code header."""
    build = app.openapi
    done: list[bool] = []

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI caches it; completing it once is enough
        if not done:
            if secured:
                secure(schema)
            document_errors(schema)
            document_links(schema)
            done.append(True)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


#: The one error body (`gateway/errors.py`), whatever the status.
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string", "description": "Stable, machine-readable."},
                "message": {"type": "string", "description": "For a person; may change."},
                "request_id": {"type": "string", "description": "As in X-Request-ID."},
            },
        }
    },
}
_ERROR_RESPONSE = {
    "description": "An error: 400 undecodable body, 401 no or bad key, 403 scope, "
    "allowlist or second factor, 404 unknown name, 409 conflict, 413 too large, 415 "
    "media type, 422 invalid field, 429 rate limit (Retry-After), 503 not ready or a "
    "server it needs is down (Retry-After), 504 timed out.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Every operation's errors: the one `Error` body under `default`, and FastAPI's 422
    (its own `detail` list, which the gateway never sends) replaced by it."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for operations in schema.get("paths", {}).values():
        for method, operation in operations.items():
            if method not in _METHODS:
                continue
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = {"description": "Invalid field", **_ERROR_RESPONSE}
                responses["422"]["description"] = "An invalid field (the message names it)."
            responses.setdefault("default", _ERROR_RESPONSE)
    schemas = schema["components"]["schemas"]
    referenced = json.dumps(schema.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}" not in referenced:
            schemas.pop(unused, None)
    return schema


def _ref(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


_TASK_ID = {"task_id": "$response.body#/task_id"}
_UPSERTED = "$request.body#/documents/0"
#: What an answer lets a client call next (OpenAPI links: Swagger UI shows them, and
#: Schemathesis follows them in its stateful runs, tests/unit/test_fuzz.py).
LINKS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("/v1/inference/async", "post", "202"): {
        "GetTask": {"operationRef": _ref("/v1/tasks/{task_id}", "get"), "parameters": _TASK_ID},
        "CancelTask": {
            "operationRef": _ref("/v1/tasks/{task_id}", "delete"),
            "parameters": _TASK_ID,
        },
    },
    ("/v1/data/upsert", "post", "200"): {
        "SearchUpserted": {
            "operationRef": _ref("/v1/data/search", "post"),
            "requestBody": {"index": "$request.body#/index", "query": f"{_UPSERTED}/text"},
        },
        "DeleteUpserted": {
            "operationRef": _ref("/v1/data/delete", "post"),
            "requestBody": {"index": "$request.body#/index", "document_ids": [f"{_UPSERTED}/id"]},
        },
    },
    ("/v1/admin/keys", "post", "201"): {
        "RevokeKey": {
            "operationRef": _ref("/v1/admin/keys/{key_id}", "delete"),
            "parameters": {"key_id": "$response.body#/id"},
        },
    },
}


def document_links(schema: dict[str, Any]) -> dict[str, Any]:
    """`LINKS` on the responses of the operations this gateway serves."""
    paths = schema.get("paths", {})
    for (path, method, status), links in LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is not None:
            response["links"] = {
                name: link
                for name, link in links.items()
                if _target_served(paths, link["operationRef"])
            }
    return schema


def _target_served(paths: dict[str, Any], ref: str) -> bool:
    _, _, rest = ref.partition("#/paths/")
    path, _, method = rest.rpartition("/")
    return method in paths.get(path.replace("~1", "/").replace("~0", "~"), {})


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
                _add_header(operation, _OTP_PARAMETER)
            if "requestBody" in operation:  # what carries text the audit may keep
                _add_header(operation, _SUBJECT_PARAMETER)
    return schema


def _add_header(operation: dict[str, Any], parameter: dict[str, Any]) -> None:
    parameters = operation.setdefault("parameters", [])
    if not any(p.get("name") == parameter["name"] for p in parameters):
        parameters.append(dict(parameter))
