"""Authorization in-process with Redis: second-factor lockout and failures per address,
each with its limits in memory and in Redis (the Redis case skipped when it is down).

The rest of authorization, without services, is `tests/unit/test_security_access.py`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
import redis
import sqlalchemy as sa
from gateways import audit_rows, close_all, gateway, new_key, seed_support_and_other
from support import AUTH, require_service

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    """A state folder whose desired state has support-* and other-* models and indexes."""
    yield seed_support_and_other(tmp_path)
    close_all()


# ---- second factor: lockout after wrong codes -----------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_wrong_codes_lock_the_sensitive_routes_of_a_key(home: Path, backend: str) -> None:
    if backend == "redis":
        require_service("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    client = gateway(home, redis_url=REDIS_URL if backend == "redis" else None)
    key = new_key(client, scopes=["models:admin", "inference"], totp=True)
    try:
        otp = pyotp.TOTP(key["totp_secret"])
        valid = {otp.at(time.time() + 30 * o) for o in (-1, 0, 1, 2)}
        wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)
        body = {"name": "no-such-model"}
        statuses = []
        for _ in range(5):  # the issue: 5 wrong codes lock for 15 minutes
            r = client.post(
                "/v1/models/unload", json=body, headers={**key["headers"], "X-Dify-OTP": wrong}
            )
            statuses.append(r.status_code)
        assert statuses == [401] * 4 + [429]
        assert int(r.headers["retry-after"]) == 900
        r = client.post(
            "/v1/models/unload", json=body, headers={**key["headers"], "X-Dify-OTP": otp.now()}
        )
        assert r.status_code == 429 and "locked" in r.json()["error"]["message"]
        assert 0 < int(r.headers["retry-after"]) <= 900
        assert client.get("/v1/models", headers=key["headers"]).status_code == 200
        details = [row["detail"] or "" for row in audit_rows(client, key_id=key["id"], status=429)]
        assert details[0] == "second factor locked for 900 s after 5 wrong codes"
        assert "locked" in details[1]
    finally:
        if backend == "redis":
            r_client = redis.Redis.from_url(REDIS_URL)
            stale = list(r_client.scan_iter(match=f"dify-mirror:otp:{key['id']}:*"))
            if stale:
                r_client.delete(*stale)
            r_client.close()


# ---- failures before a key is known ---------------------------------------------------------


def _random_key() -> str:
    return f"dm_{uuid.uuid4().hex[:12]}_{uuid.uuid4().hex}{uuid.uuid4().hex}"


class _StoppedClock:
    """A block that never ends while the test looks at it."""

    def __call__(self) -> float:
        return 1000.0


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_an_address_that_keeps_failing_is_refused_before_the_key_store(
    home: Path, backend: str
) -> None:
    from dify_serving.security.failures import AUTH_FAILURE_BURST, AddressFailures

    peer = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    redis_url = None
    if backend == "redis":
        require_service("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
        redis_url = REDIS_URL
    admin = gateway(home)
    fresh = new_key(admin, scopes=["inference"])  # valid, never used from the peer
    client = gateway(home, peer=peer, redis_url=redis_url)
    guard = client.app.state.guard  # type: ignore[attr-defined]
    # A budget that earns nothing back while the test runs (the limiter's own clock, or
    # Redis TIME, keeps going: at 1/s a slow machine would earn the 21st request a 401).
    guard.failures = AddressFailures(guard.limiter, per_s=0.001, clock=_StoppedClock())
    try:
        assert client.get("/v1/models", headers=AUTH).status_code == 200  # verified here
        queries: list[str] = []
        sa.event.listen(guard.keys.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
        storm = AUTH_FAILURE_BURST + 300
        started = time.monotonic()
        responses = [
            client.get("/v1/models", headers={"Authorization": f"Bearer {_random_key()}"})
            for _ in range(storm)
        ]
        elapsed = time.monotonic() - started
        codes = [r.status_code for r in responses]
        assert codes == [401] * AUTH_FAILURE_BURST + [429] * (storm - AUTH_FAILURE_BURST)
        assert int(responses[-1].headers["retry-after"]) >= 1
        # the key store answered until the budget ran out (one more), then never again
        assert len(queries) == AUTH_FAILURE_BURST + 1
        assert client.get("/v1/models", headers=AUTH).status_code == 200  # known here
        assert client.get("/v1/models", headers=fresh["headers"]).status_code == 429
        assert len(queries) == AUTH_FAILURE_BURST + 1

        refusals = [r for r in audit_rows(client, client_ip=peer) if r["status"] != 200]
        counted = sum(  # a row of its own, or "auth failures: N more in 1s ..."
            int(r["detail"].split()[2]) if r["detail"].startswith("auth failures:") else 1
            for r in refusals
        )
        assert counted == storm + 1
        assert len(refusals) <= 2 * (elapsed + 2)  # at most two rows a second
    finally:
        if redis_url:
            r_client = redis.Redis.from_url(redis_url)
            r_client.delete(f"dm:rl:authfail:{peer}")
            r_client.close()
