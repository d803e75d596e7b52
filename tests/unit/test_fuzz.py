"""Schemathesis against the gateway's own `/openapi.json`: every route, with a valid key.

An in-process gateway (guard on: keys, audit, limits) answers from stand-in replicas
(`standins.py`) and applies changes to a stand-in Ray dashboard, so a request reaches
the route's real code, not a 503 for a missing Ray. For each operation Schemathesis
generates parameters, headers and bodies from the document (valid and not), sends them
with the admin key, and checks what comes back: no 5xx (but the documented 503 of a
model still loading), a status, content type, body and SSE events the document declares,
invalid input refused, and no answer without a key or with a wrong one. Stateful runs
follow the document's links: a task submitted, polled and cancelled; documents upserted,
searched and deleted; a key created and revoked.

One check is off, `positive_data_acceptance`: the document does not state every rule a
body must meet (name patterns, "prompt or messages"), so a request the document allows
can get a 422. `make test` runs 10 examples per operation (`DIFY_MIRROR_FUZZ_EXAMPLES`);
`make fuzz` runs 300.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance
from standins import guarded_app
from support import API_KEY

EXAMPLES = int(os.environ.get("DIFY_MIRROR_FUZZ_EXAMPLES", "10"))


@pytest.fixture(scope="module")
def gateway_app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    app: FastAPI = guarded_app(tmp_path_factory.mktemp("fuzz"))
    # The auth checks send every operation again without a key and with a wrong one, all
    # from one address: past 20 failures the guard would lock that address out (429,
    # tested in test_security_*), and the checks want the 401 behind it.
    app.state.guard.failures.burst = 1_000_000
    yield app
    guard = getattr(app.state, "guard", None)
    if guard is not None:
        guard.close()


@pytest.fixture(scope="module")
def api_schema(gateway_app: Any) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", gateway_app)

    @schema.auth()
    class AdminKey:
        """The bootstrap admin key on every case: the auth checks then know it is a real
        credential and send each operation once more without it and with a wrong one."""

        def get(self, case: Any, context: Any) -> str:
            return API_KEY

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """No 5xx, except the documented 503 of a model or index that is not running yet
    (one the fuzzer itself just loaded), with its Retry-After."""
    if response.status_code < 500:
        return
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "(not the error body)"
    loading = response.status_code == 503 and code in ("model_not_ready", "index_not_ready")
    if not (loading and "retry-after" in response.headers):
        raise AssertionError(f"server error {response.status_code} {code}")


def _fuzz(operation: Any) -> None:
    """`EXAMPLES` cases of one operation, each sent with the admin key and validated.
    (Schemathesis's pytest integration reads a node attribute pytest 9.2 removed, so
    the cases are drawn with Hypothesis directly.)"""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        case.call_and_validate(
            excluded_checks=[not_a_server_error, positive_data_acceptance],
            additional_checks=[no_server_error],
        )

    run()


def test_every_route_keeps_its_contract(gateway_app: Any, api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    routes = {
        f"{method} {context.path}"
        for context in iter_route_contexts(list(gateway_app.routes))
        if isinstance(context.original_route, APIRoute) and context.original_route.include_in_schema
        for method in context.methods or ()
    }
    assert {o.label for o in operations} == routes  # every route is documented
    broken = {}
    for operation in operations:
        try:
            _fuzz(operation)
        except (Exception, BaseExceptionGroup) as exc:  # reported with the others
            broken[operation.label] = str(exc)[:1500]
    assert not broken, "\n\n".join(f"{label}:\n{why}" for label, why in broken.items())


CHECKS = {
    "excluded_checks": [not_a_server_error, positive_data_acceptance],
    "additional_checks": [no_server_error],
}


def test_linked_operations_keep_their_contract(api_schema: Any) -> None:
    """Sequences that follow the links Schemathesis finds between operations (a key that
    is created, used and revoked; a task submitted, polled, cancelled; documents
    upserted, searched, deleted), each response checked as above."""
    machine = api_schema.as_state_machine()
    rules = {n for n in dir(machine) if "__" in n and not n.startswith("_")}
    for link in ("GetTask", "CancelTask", "SearchUpserted", "DeleteUpserted", "RevokeKey"):
        assert any(f"_{link}_" in rule or f"_{link}__" in rule for rule in rules), link

    failures: dict[str, str] = {}
    steps: list[str] = []

    class Fuzzed(machine):  # type: ignore[misc, valid-type]
        def after_call(self, response: Any, case: Any) -> None:
            steps.append(case.operation.label)

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            try:
                case.validate_response(
                    response,
                    excluded_checks=CHECKS["excluded_checks"],
                    additional_checks=CHECKS["additional_checks"],
                    transport_kwargs=kwargs or None,
                )
            except (Exception, BaseExceptionGroup) as exc:  # kept, not raised (see phases)
                failures.setdefault(case.operation.label, str(exc)[:1500])

    # Short runs, one after another: Hypothesis builds a sequence by replaying a prefix
    # of an earlier one, but the gateway has moved on since (the keys, tasks and models
    # earlier steps created), so an answer, and the link it allows, can differ and
    # Hypothesis stops the run (FlakyStrategyDefinition). Every step was checked as it
    # came (`failures`); Schemathesis's own runner ignores that noise too. The next run
    # goes on from where the gateway is.
    quick = settings(
        max_examples=10,
        stateful_step_count=6,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: replays diverge
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    for _ in range(max(1, EXAMPLES // 10)):
        with contextlib.suppress(FlakyStrategyDefinition):
            Fuzzed.run(settings=quick)
    print(f"{len(steps)} linked steps, {len(set(steps))} operations")
    assert len(steps) >= EXAMPLES, steps
    assert not failures, "\n\n".join(f"{label}:\n{why}" for label, why in failures.items())
