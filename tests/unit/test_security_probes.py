"""A security probe matrix generated from the gateway's own `/openapi.json`.

Each operation whose `security` asks for the bearer key is probed: without a key, with
a key that lacks its scopes, from outside the key's allowlist (with and without a forged
`X-Forwarded-For`), over the key's requests/minute, over its tokens/minute when the
route generates, and, where its rule is sensitive, with no, a wrong, a fresh and a
replayed second-factor code. Rules are read from the document (`security`,
`x-dify-rule`), never from a list kept here, so a route added later is probed as soon as
it is documented. Each refusal is looked up in the audit log by its request id, and
the last test runs the refusals again and verifies the chain behind them.

The document is read once at collection from a throwaway gateway (the parameters need
it before fixtures exist); the probes run against one in-process gateway per module with
stand-in replicas, as `test_fuzz.py` does. Path parameters are well-formed names that
exist nowhere and bodies are `{}`: the guard decides before routing, and a request it
admits (the fresh second-factor code) then ends in a 404 or 422 that changes nothing.
Refusals without a key come from a new address each, so no address reaches its failure
budget and each leaves its own audit row rather than a per-second count.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from fastapi.testclient import TestClient
from standins import guarded_app
from support import AUTH

from dify_serving.gateway.app import create_app
from dify_serving.gateway.policy import RULE_KEY
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions
from dify_serving.security.grants import ADMIN, SCOPES
from dify_serving.security.secrets import Secrets
from dify_serving.security.totp import verify as totp_verify

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
#: Path parameters: well-formed, and naming nothing the gateway has.
_PATH_VALUES = {"key_id": "nosuchkey000"}
_ABSENT = "absent-probe"
UNAUTHORIZED = "missing or invalid API key (Authorization: Bearer dm_...)"
UNKNOWN_KEY = "Bearer dm_nosuchkey000_" + "Zz9" * 12
#: The allowlisted keys' network, the peer outside it, and a forged hop inside it.
KEY_NETWORK, OUTSIDE, FORGED = "10.0.0.0/8", "203.0.113.9", "10.1.2.3"
LOCAL = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Operation:
    """One documented operation and the rule the document states for it."""

    method: str
    path: str
    keyed: bool
    scopes: tuple[str, ...] = ()
    any_scope: bool = False
    sensitive: bool = False
    generates: bool = False
    has_body: bool = False

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def url(self) -> str:
        return re.sub(r"\{([^}]+)\}", lambda m: _PATH_VALUES.get(m[1], _ABSENT), self.path)


def operations(document: dict[str, Any]) -> list[Operation]:
    """Every operation; keyed when its `security` (or the document's) requires something."""
    default = document.get("security") or []
    found = []
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method not in _METHODS:
                continue
            rule = op.get(RULE_KEY) or {}
            found.append(
                Operation(
                    method.upper(),
                    path,
                    keyed=any(op.get("security", default)),
                    scopes=tuple(rule.get("scopes", ())),
                    any_scope=rule.get("any_scope", False),
                    sensitive=rule.get("sensitive", False),
                    generates=rule.get("generates", False),
                    has_body="requestBody" in op,
                )
            )
    return found


def _served_document() -> dict[str, Any]:
    """The document a default guarded gateway serves (read at collection, then closed)."""
    with tempfile.TemporaryDirectory() as home:
        options = GatewayOptions(home=home, security=SecurityOptions())
        app = create_app(GatewayState(options), Secrets(Path(home)))
        try:
            document: dict[str, Any] = TestClient(app).get("/openapi.json").json()
            return document
        finally:
            app.state.guard.close()


DOCUMENT = _served_document()
OPERATIONS = operations(DOCUMENT)
KEYED = [o for o in OPERATIONS if o.keyed]
PUBLIC = [o for o in OPERATIONS if not o.keyed]


def _cases(ops: list[Operation]) -> Any:
    return pytest.mark.parametrize("op", ops, ids=[o.label for o in ops])


def _all_but(op: Operation) -> tuple[str, ...]:
    """Every scope a key may hold but admin and the ones `op` names."""
    return tuple(s for s in SCOPES if s != ADMIN and s not in op.scopes)


def _scope_cases() -> list[Any]:
    """Per operation: a key with every scope but the route's; for a rule that needs all of
    several scopes, also one key per scope that lacks only that one."""
    ordinary = [s for s in SCOPES if s != ADMIN]
    cases = []
    for op in KEYED:
        cases.append(pytest.param(op, _all_but(op), op.scopes, id=f"{op.label} without its scopes"))
        if len(op.scopes) > 1 and not op.any_scope:
            for scope in op.scopes:
                held_but_one = tuple(s for s in ordinary if s != scope)
                cases.append(pytest.param(op, held_but_one, (scope,), id=f"{op.label} no {scope}"))
    return cases


def _address(n: int) -> str:
    """The n-th address of 198.18.0.0/15: a fresh client for each refusal without a key."""
    return str(ipaddress.IPv4Address("198.18.0.0") + n)


class Gateway:
    """The module's gateway, seen from any address; keys made through its admin API."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.guard = app.state.guard
        self._clients: dict[str, TestClient] = {}
        self._keys: dict[str, dict[str, Any]] = {}

    def client(self, peer: str = LOCAL) -> TestClient:
        if peer not in self._clients:
            self._clients[peer] = TestClient(
                self.app, client=(peer, 40000), raise_server_exceptions=False
            )
        return self._clients[peer]

    def send(
        self, op: Operation, headers: dict[str, str] | None = None, peer: str = LOCAL
    ) -> httpx.Response:
        body = {} if op.has_body else None
        return self.client(peer).request(op.method, op.url, headers=headers, json=body)

    def key(self, fresh: bool = False, **body: Any) -> dict[str, Any]:
        """A key created by the bootstrap admin (one per distinct body unless `fresh`)."""
        label = repr(sorted(body.items()))
        if fresh or label not in self._keys:
            r = self.client().post("/v1/admin/keys", json={"name": "probe", **body}, headers=AUTH)
            assert r.status_code == 201, r.text
            created: dict[str, Any] = r.json()
            created["headers"] = {"Authorization": f"Bearer {created['key']}"}
            if fresh:
                return created
            self._keys[label] = created
        return self._keys[label]

    def audit_row(self, response: httpx.Response, route: str) -> dict[str, Any]:
        """The one audit row of `response` (refusal counts and batches flushed first)."""
        rid = response.headers["x-request-id"]
        rows = self.rows(route=route, status=response.status_code)
        found = [row for row in rows if row["request_id"] == rid]
        assert len(found) == 1, f"{len(found)} audit rows for request {rid} on {route}"
        return found[0]

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        self.guard.refusals.flush()
        self.guard.audit.flush()
        rows: list[dict[str, Any]] = []
        cursor = None
        while True:
            page, cursor = self.guard.audit.query(limit=1000, cursor=cursor, **where)
            rows += page
            if cursor is None:
                return rows


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    app = guarded_app(tmp_path_factory.mktemp("probes"))
    yield Gateway(app)
    app.state.guard.close()


def _error(r: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = r.json()["error"]
    assert error["request_id"] == r.headers["x-request-id"]
    return error


# ---- the document ---------------------------------------------------------------------------


def test_the_document_keys_every_v1_operation_and_states_its_rule(gateway: Gateway) -> None:
    served = operations(gateway.client().get("/openapi.json").json())
    assert served == OPERATIONS  # the probes were generated from what this gateway serves
    assert KEYED and {o.label for o in KEYED} == {
        o.label for o in OPERATIONS if o.path.startswith("/v1/")
    }
    unruled = [o.label for o in KEYED if not o.scopes]
    assert not unruled, f"keyed operations without scopes in {RULE_KEY}: {unruled}"


@_cases(PUBLIC)
def test_documented_public_operations_answer_without_a_key(gateway: Gateway, op: Operation) -> None:
    assert gateway.send(op).status_code not in (401, 403)


# ---- the matrix -----------------------------------------------------------------------------


def _refused_without_a_key(gateway: Gateway, op: Operation, n: int) -> list[httpx.Response]:
    """No header, then a key that does not exist: the same 401 body, each audited."""
    responses = []
    for i, headers in enumerate(({}, {"Authorization": UNKNOWN_KEY})):
        peer = _address(2 * n + i)
        r = gateway.send(op, headers, peer=peer)
        assert r.status_code == 401, r.text
        assert _error(r) | {"request_id": ""} == {
            "code": "unauthorized",
            "message": UNAUTHORIZED,
            "request_id": "",
        }
        assert r.headers["www-authenticate"] == "Bearer"
        row = gateway.audit_row(r, op.path)
        assert (row["method"], row["client_ip"]) == (op.method, peer)
        responses.append(r)
    return responses


@_cases(KEYED)
def test_every_keyed_route_refuses_a_request_without_a_key(gateway: Gateway, op: Operation) -> None:
    _refused_without_a_key(gateway, op, KEYED.index(op))


def _refused_for_scope(
    gateway: Gateway, op: Operation, held: tuple[str, ...], missing: tuple[str, ...]
) -> httpx.Response:
    key = gateway.key(scopes=list(held))
    r = gateway.send(op, key["headers"])
    assert r.status_code == 403, r.text
    error = _error(r)
    assert error["code"] == "forbidden"
    assert all(scope in error["message"] for scope in missing), error["message"]
    assert gateway.audit_row(r, op.path)["key_id"] == key["id"]
    return r


@pytest.mark.parametrize(("op", "held", "missing"), _scope_cases())
def test_every_keyed_route_refuses_a_key_without_its_scope(
    gateway: Gateway, op: Operation, held: tuple[str, ...], missing: tuple[str, ...]
) -> None:
    _refused_for_scope(gateway, op, held, missing)


def _refused_outside_the_allowlist(gateway: Gateway, op: Operation) -> list[httpx.Response]:
    """From outside the key's network; then the same, naming an inside hop in XFF."""
    key = gateway.key(scopes=list(op.scopes), ip_allowlist=[KEY_NETWORK])
    responses = []
    for forged in ({}, {"X-Forwarded-For": FORGED}):
        r = gateway.send(op, key["headers"] | forged, peer=OUTSIDE)
        assert r.status_code == 403, r.text
        error = _error(r)
        assert error["code"] == "address_not_allowed"
        assert OUTSIDE in error["message"] and FORGED not in error["message"]
        row = gateway.audit_row(r, op.path)
        assert (row["key_id"], row["client_ip"]) == (key["id"], OUTSIDE)
        responses.append(r)
    return responses


@_cases(KEYED)
def test_every_keyed_route_refuses_a_key_outside_its_allowlist_even_with_a_forged_xff(
    gateway: Gateway, op: Operation
) -> None:
    _refused_outside_the_allowlist(gateway, op)


def test_an_allowlisted_key_is_admitted_from_its_own_network(gateway: Gateway) -> None:
    """The control of the probe above: the address was the only reason."""
    key = gateway.key(scopes=["inference"], ip_allowlist=[KEY_NETWORK])
    assert gateway.client(FORGED).get("/v1/models", headers=key["headers"]).status_code == 200


def _assert_rate_limited(gateway: Gateway, r: httpx.Response, op: Operation, key: Any) -> None:
    assert r.status_code == 429, r.text
    assert _error(r)["code"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining"] == "0"
    assert gateway.audit_row(r, op.path)["key_id"] == key["id"]


@_cases(KEYED)
def test_every_keyed_route_refuses_a_key_over_its_requests_per_minute(
    gateway: Gateway, op: Operation
) -> None:
    key = gateway.key(scopes=[ADMIN], rate_limit={"requests_per_minute": 1})
    gateway.client().get("/v1/models", headers=key["headers"])  # the minute's one request
    r = gateway.send(op, key["headers"])
    _assert_rate_limited(gateway, r, op, key)
    assert r.headers["x-ratelimit-limit"] == "1"
    assert "requests per minute" in _error(r)["message"]


def _token_key(gateway: Gateway) -> dict[str, Any]:
    """A key whose tokens/minute a generation has overdrawn (one token back per minute)."""
    key = gateway.key(scopes=["inference", "data:read"], rate_limit={"tokens_per_minute": 1})
    body = {"model": "llm", "prompt": "hi", "max_tokens": 8}
    r = gateway.client().post("/v1/inference", json=body, headers=key["headers"])
    assert r.status_code in (200, 429), r.text  # 429: an earlier test overdrew it already
    return key


@_cases([o for o in KEYED if o.generates])
def test_every_generating_route_refuses_a_key_over_its_tokens_per_minute(
    gateway: Gateway, op: Operation
) -> None:
    key = _token_key(gateway)
    r = gateway.send(op, key["headers"])
    _assert_rate_limited(gateway, r, op, key)
    assert "tokens per minute" in _error(r)["message"]


def test_the_tokens_per_minute_spare_routes_that_generate_nothing(gateway: Gateway) -> None:
    key = _token_key(gateway)
    assert gateway.client().get("/v1/models", headers=key["headers"]).status_code == 200


def _wrong_code(secret: str) -> str:
    return next(
        c for c in (f"{n:06d}" for n in range(0, 10**6, 7919)) if totp_verify(secret, c) is None
    )


@_cases([o for o in KEYED if o.sensitive])
def test_every_sensitive_route_takes_each_second_factor_code_once(
    gateway: Gateway, op: Operation
) -> None:
    key = gateway.key(fresh=True, scopes=list(op.scopes), totp=True)
    code = pyotp.TOTP(key["totp_secret"]).now()
    refusals = [
        (None, "second_factor_required"),
        (_wrong_code(key["totp_secret"]), "second_factor_invalid"),
        (code, None),  # admitted: the route answers (404/422 for what does not exist)
        (code, "second_factor_invalid"),  # the same code again
    ]
    for sent, refused in refusals:
        otp = {} if sent is None else {"X-Dify-OTP": sent}
        r = gateway.send(op, key["headers"] | otp)
        if refused is None:
            assert r.status_code not in (401, 403, 429) and r.status_code < 500, r.text
            continue
        assert r.status_code == 401, r.text
        assert _error(r)["code"] == refused
        assert gateway.audit_row(r, op.path)["key_id"] == key["id"]


# ---- the audit trail behind the matrix ------------------------------------------------------


def test_the_audit_chain_verifies_after_the_matrix_and_holds_each_refusal(
    gateway: Gateway,
) -> None:
    """Order-free (xdist may split the module): the refusals are made again here, then
    every one must have its row, and the whole chain must verify."""
    started = time.time()
    refused: list[httpx.Response] = []
    for n, op in enumerate(KEYED):
        refused += _refused_without_a_key(gateway, op, 10_000 + n)
        refused.append(_refused_for_scope(gateway, op, _all_but(op), op.scopes))
        refused += _refused_outside_the_allowlist(gateway, op)
    rows = {row["request_id"]: row for row in gateway.rows(since=started - 1)}
    missing = [r.headers["x-request-id"] for r in refused if r.headers["x-request-id"] not in rows]
    assert not missing, f"{len(missing)} of {len(refused)} refusals left no audit row"
    assert {rows[r.headers["x-request-id"]]["status"] for r in refused} == {401, 403}
    report = gateway.guard.audit.verify()
    assert report.ok, report.summary()
    assert report.rows_checked >= len(refused)
