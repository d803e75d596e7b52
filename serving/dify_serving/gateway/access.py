"""What the calling key may reach beyond its route: body-chosen scopes, models, indexes.

The policy table (`policy.py`) decides per route before any work is done; some rights
depend on the body instead: a chat completion that names an `index` retrieves chunk
text, so it needs `data:read` as `/v1/data/search` does, and a key confined to
`support-*` may only name models and indexes that fit. The security middleware puts the
admitted key in the request's context (`notes.REQUEST`, a context variable, so the data
plane checks it without threading the request through every call); the gateway state
and the routers ask this module. With security off there is no key and everything is
allowed.

A refused resource is named in a 403 before its existence is looked up, so a confined
key cannot probe which names exist outside its patterns (as Kubernetes RBAC answers
403 for a forbidden object whether or not it exists). `admin` reaches every model and
index and sees local weight paths; other keys see `model_id` only when it is not a path
on the server.
"""

from __future__ import annotations

from collections.abc import Iterable

from dify_serving.gateway.errors import ApiError
from dify_serving.gateway.notes import REQUEST, note
from dify_serving.security.grants import ADMIN, KeyRecord, allows, matches
from dify_serving.specs import is_local_model_id


def current() -> KeyRecord | None:
    """The key of the request being served; None when security is off."""
    request = REQUEST.get()
    return None if request is None else request.key


def is_admin() -> bool:
    key = current()
    return key is None or ADMIN in key.scopes


def require_scope(scope: str) -> None:
    """403 naming `scope` unless the key holds it (the middleware's refusal, from a body)."""
    key = current()
    if key is not None and not allows(key, scope):
        note(detail=f"forbidden: lacks scope {scope}")
        raise ApiError(403, "forbidden", f"key {key.id} lacks scope {scope} for this request")


def may_use_model(name: str) -> bool:
    key = current()
    return key is None or ADMIN in key.scopes or matches(key.models, name)


def may_use_index(name: str) -> bool:
    key = current()
    return key is None or ADMIN in key.scopes or matches(key.indexes, name)


def check_model(name: str) -> None:
    if not may_use_model(name):
        _refuse("model", name)


def check_index(name: str) -> None:
    if not may_use_index(name):
        _refuse("index", name)


def visible_indexes(names: Iterable[str]) -> list[str]:
    return [n for n in names if may_use_index(n)]


def visible_models(names: Iterable[str]) -> list[str]:
    return [n for n in names if may_use_model(n)]


def shown_model_id(model_id: str) -> str | None:
    """`model_id` as this key may see it: a local path only for admin, else None."""
    return model_id if not is_local_model_id(model_id) or is_admin() else None


def without_path(text: str | None, model_id: str) -> str | None:
    """`text` (a status message) with a local `model_id` path blanked for non-admin keys."""
    if not text or shown_model_id(model_id) is not None:
        return text
    return text.replace(model_id, "<local path>")


def _refuse(kind: str, name: str) -> None:
    key = current()
    assert key is not None
    note(detail=f"forbidden: {kind} {name}")
    raise ApiError(403, "forbidden", f"key {key.id} may not use {kind} {name[:80]!r}")
