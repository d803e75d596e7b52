"""Which scope each route needs, and which routes are sensitive (a second factor).

One table, read top to bottom, first match wins. It is the whole authorization policy
of the HTTP API, kept apart from the mechanism (`gateway/security.py`) so that a review
of "who may call what" reads one page. Routes not listed under `/v1` need a valid key
and no particular scope (they answer 404 anyway); routes outside `/v1` are public
(probes, docs). Every `/v1` route has exactly one rule here and every rule a route
(`gaps`, checked by a test against the app with all modules), so a new route cannot
slip in needing no scope. Rights that depend on the body (an `index` in a chat
completion, the models and indexes a key may name) are checked in the data plane
(`access.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from dify_serving.security.keys import (
    ADMIN,
    AUDIT_READ,
    DATA_READ,
    DATA_WRITE,
    INFERENCE,
    MODELS_ADMIN,
)


@dataclass(frozen=True, slots=True)
class Rule:
    template: str  # the route as the audit log names it
    scopes: tuple[str, ...] = ()  # all of these are needed
    sensitive: bool = False  # needs a second factor for keys that have one
    public: bool = False
    generates: bool = False  # counts against tokens/minute


def _rule(method: str, path: str, *scopes: str, **flags: bool) -> tuple[str, re.Pattern[str], Rule]:
    pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
    return method, pattern, Rule(path, scopes, **flags)


RULES = [
    _rule("GET", "/healthz", public=True),
    _rule("GET", "/readyz", public=True),
    _rule("GET", "/docs", public=True),
    _rule("GET", "/docs/oauth2-redirect", public=True),
    _rule("GET", "/openapi.json", public=True),
    _rule("GET", "/v1/models", INFERENCE),
    _rule("GET", "/v1/models/status", INFERENCE),
    _rule("POST", "/v1/models/load", MODELS_ADMIN, sensitive=True),
    _rule("POST", "/v1/models/unload", MODELS_ADMIN, sensitive=True),
    _rule("POST", "/v1/inference", INFERENCE, generates=True),
    _rule("POST", "/v1/chat/completions", INFERENCE, generates=True),
    _rule("POST", "/v1/completions", INFERENCE, generates=True),
    _rule("POST", "/v1/embeddings", INFERENCE),
    _rule("POST", "/v1/chat", INFERENCE, DATA_READ, generates=True),
    _rule("POST", "/v1/data/clean", DATA_READ),
    _rule("POST", "/v1/data/embed", DATA_READ),
    _rule("POST", "/v1/data/search", DATA_READ),
    _rule("GET", "/v1/indexes", DATA_READ),
    _rule("POST", "/v1/data/upsert", DATA_WRITE),
    _rule("POST", "/v1/data/delete", DATA_WRITE, sensitive=True),
    _rule("GET", "/v1/audit/logs", AUDIT_READ),
    _rule("GET", "/v1/audit/export", AUDIT_READ, sensitive=True),
    _rule("POST", "/v1/admin/keys", ADMIN, sensitive=True),
    _rule("GET", "/v1/admin/keys", ADMIN, sensitive=True),
    _rule("DELETE", "/v1/admin/keys/{id}", ADMIN, sensitive=True),
]

_PUBLIC_OTHER = Rule("(public)", public=True)
_EXACT = {(m, r.template): r for m, _, r in reversed(RULES) if "{" not in r.template}


def rule_for(method: str, path: str) -> Rule:
    """The rule of a request; unknown `/v1` routes need a key, anything else is public."""
    head = "GET" if method == "HEAD" else method
    exact = _EXACT.get((head, path))
    if exact is not None:
        return exact
    for rule_method, pattern, rule in RULES:
        if rule_method == head and pattern.match(path):
            return rule
    if path == "/v1" or path.startswith("/v1/"):
        return Rule(path if len(path) < 200 else path[:200])
    return _PUBLIC_OTHER


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def gaps(routes: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(`/v1` routes with no rule, rules with no route) for `(method, path)` pairs.

    Parameter names may differ (`{id}` here, `{key_id}` in the router); HEAD rides on GET.
    """
    served = {(m, _shape(p)) for m, p in routes if p.startswith("/v1") and m != "HEAD"}
    ruled = {(m, _shape(r.template)) for m, _, r in RULES if r.template.startswith("/v1")}
    return (
        sorted(f"{m} {p}" for m, p in served - ruled),
        sorted(f"{m} {p}" for m, p in ruled - served),
    )
