"""Which scope each route needs, declared at the route, enforced before the route runs.

Every `/v1` route says who may call it in its decorator: `openapi_extra=needs(SCOPE,
sensitive=..., generates=...)`. `install(app)` collects the declarations into the table
the security middleware reads (`rule_for`), and refuses to build an app with a `/v1`
route that declares none, so a route cannot exist without its rule. The OpenAPI document
shows each route's rule (`x-dify-rule`), so "who may call what" is one grep of the
routers and one look at `/docs`. Routes outside `/v1` are public (probes, docs). Rights
that depend on the body (an `index` in a chat completion, the models and indexes a key
may name) are checked in the data plane (`access.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

#: The `openapi_extra` key that carries a route's rule.
RULE_KEY = "x-dify-rule"


@dataclass(frozen=True, slots=True)
class Rule:
    template: str  # the route as the audit log names it
    scopes: tuple[str, ...] = ()  # all of these are needed (one of them: any_scope)
    sensitive: bool = False  # needs a second factor for keys that have one
    public: bool = False
    generates: bool = False  # counts against tokens/minute
    any_scope: bool = False


def needs(
    *scopes: str, sensitive: bool = False, generates: bool = False, any_scope: bool = False
) -> dict[str, Any]:
    """A route's rule, as the `openapi_extra` of its decorator: the scopes it needs (all
    of them, or one of them with `any_scope`), whether keys with a second factor must give
    a code, whether it counts tokens against the key's tokens/minute."""
    rule = {"scopes": list(scopes), "sensitive": sensitive, "generates": generates}
    return {RULE_KEY: rule | ({"any_scope": True} if any_scope else {})}


class MissingRule(RuntimeError):
    """A `/v1` route declares no rule: the app is not built."""


_PUBLIC_OTHER = Rule("(public)", public=True)
_EXACT: dict[tuple[str, str], Rule] = {}
_PATTERNS: list[tuple[str, re.Pattern[str], Rule]] = []


def rules_of(routes: Iterable[Any]) -> list[tuple[str, Rule]]:
    """(method, rule) of every API route; MissingRule for a `/v1` route without one."""
    out = []
    for context in iter_route_contexts(list(routes)):  # included routers, with prefixes
        route, path = context.original_route, context.path or ""
        if not isinstance(route, APIRoute):
            continue
        declared = (route.openapi_extra or {}).get(RULE_KEY)
        if path == "/v1" or path.startswith("/v1/"):
            if declared is None:
                raise MissingRule(
                    f"{sorted(context.methods or ())} {path} declares no rule: add "
                    "openapi_extra=policy.needs(...) to its decorator"
                )
            rule = Rule(
                path,
                tuple(declared["scopes"]),
                sensitive=declared["sensitive"],
                generates=declared["generates"],
                any_scope=declared.get("any_scope", False),
            )
        else:
            rule = Rule(path, public=True)
        out += [(method, rule) for method in sorted(context.methods or ())]
    return out


def install(app: FastAPI) -> None:
    """Add the rules of `app`'s routes to the table (the same routes give the same rules)."""
    for method, rule in rules_of(app.routes):
        if "{" in rule.template:
            pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", rule.template) + "$")
            if not any(m == method and r == rule for m, _, r in _PATTERNS):
                _PATTERNS.append((method, pattern, rule))
        else:
            _EXACT[(method, rule.template)] = rule


def rule_for(method: str, path: str) -> Rule:
    """The rule of a request; unknown `/v1` routes need a key, anything else is public."""
    head = "GET" if method == "HEAD" else method
    exact = _EXACT.get((head, path))
    if exact is not None:
        return exact
    for rule_method, pattern, rule in _PATTERNS:
        if rule_method == head and pattern.match(path):
            return rule
    if path == "/v1" or path.startswith("/v1/"):
        return Rule(path if len(path) < 200 else path[:200])
    return _PUBLIC_OTHER
