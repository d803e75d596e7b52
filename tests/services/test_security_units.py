"""Security building blocks against real Redis and PostgreSQL (and SQLite): no Ray, no HTTP.

Key storage runs the same tests on SQLite and PostgreSQL; limiters run the same tests in
memory and on Redis. Redis keys use a random prefix per test and PostgreSQL a throwaway
database, both removed afterwards. What needs no service (networks, TOTP, in-memory limits
and lockouts, peppers) is `tests/unit/test_security_units.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyotp
import pytest
import redis
import sqlalchemy as sa
from support import require_service

from dify_serving.security import keys as keys_module
from dify_serving.security.db import create_engine, database_url
from dify_serving.security.grants import SCOPES, KeyRecord, allows
from dify_serving.security.keys import AuthError, KeyStore, api_keys, parse_key
from dify_serving.security.ratelimit import (
    Decision,
    Limiter,
    MemoryLimiter,
    RedisLimiter,
    RouteLimits,
)
from dify_serving.security.totp import (
    MemoryReplayStore,
    OtpGuard,
    RedisReplayStore,
    new_secret,
)

REDIS_URL = os.environ.get("DIFY_MIRROR_REDIS_URL") or "redis://127.0.0.1:6379/15"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PEPPER = b"test-pepper"
KEY_SHAPE = re.compile(r"dm_[a-z0-9]{12}_[A-Za-z0-9]{43}")
SLOW = 1e-6  # a refill rate that adds nothing measurable while a test runs


# ---- fixtures -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class FakeWallClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    name = f"dm_test_{uuid.uuid4().hex[:12]}"
    require_service("PostgreSQL", lambda: psycopg.connect(PG_ADMIN, connect_timeout=3).close())
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield database_url(tmp_path / "db", None, "keys")
        return
    url: str = request.getfixturevalue("pg_database")
    yield url
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS api_keys"))
    engine.dispose()


@pytest.fixture()
def opened(db_url: str) -> Iterator[list[KeyStore]]:
    """Every KeyStore a test opens, closed at the end."""
    stores: list[KeyStore] = []
    yield stores
    for store in stores:
        store.close()


@pytest.fixture()
def store(db_url: str, opened: list[KeyStore]) -> KeyStore:
    opened.append(KeyStore(db_url, PEPPER))
    return opened[-1]


@pytest.fixture(params=["memory", "redis"])
def limiter(request: pytest.FixtureRequest, prefix: str) -> Iterator[Limiter]:
    if request.param == "memory":
        yield MemoryLimiter()
        return
    # Generous timeouts: a busy machine must not turn the bursts below into 503s.
    redis_limiter = RedisLimiter(REDIS_URL, prefix=prefix, timeout_s=2.0, pool_timeout_s=30)
    yield redis_limiter
    redis_limiter.close()


def raw_rows(url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(api_keys))]
    engine.dispose()
    return rows


def reason(store: KeyStore, presented: str) -> str:
    with pytest.raises(AuthError) as info:
        store.authenticate(presented)
    return str(info.value.reason)


# ---- TOTP ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def otp_guard(request: pytest.FixtureRequest, prefix: str) -> Iterator[tuple[OtpGuard, FakeClock]]:
    clock = FakeClock(1_700_000_000.0)
    if request.param == "memory":
        yield OtpGuard(MemoryReplayStore(), clock=clock), clock
        return
    guard = OtpGuard(redis_url=REDIS_URL, prefix=prefix, clock=clock)
    yield guard, clock
    assert isinstance(guard.store, RedisReplayStore)
    guard.store.close()


def test_otp_guard_accepts_each_code_once(otp_guard: tuple[OtpGuard, FakeClock]) -> None:
    guard, clock = otp_guard
    secret = new_secret()
    otp = pyotp.TOTP(secret)
    window = {otp.at(clock.now + 30 * o) for o in (-1, 0, 1)}
    wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in window)
    assert not guard.check("k1", secret, wrong)
    code = otp.at(clock.now)
    assert guard.check("k1", secret, code)
    assert not guard.check("k1", secret, code)  # replay
    assert guard.check("k2", secret, code)  # another key has its own counters
    # Within the ±1 window, an earlier step is refused once a later one was used.
    clock.now += 30
    previous, current = otp.at(clock.now - 30), otp.at(clock.now)
    assert not guard.check("k1", secret, previous)
    assert guard.check("k1", secret, current)
    clock.now += 30
    assert guard.check("k1", secret, otp.at(clock.now + 30))  # clock drift: next step
    assert not guard.check("k1", secret, otp.at(clock.now))
    assert asyncio.run(guard.acheck("k3", secret, otp.at(clock.now)))


def test_otp_redis_claims_are_shared_and_expire(prefix: str) -> None:
    clock = FakeClock(1_700_000_000.0)
    secret = new_secret()
    code = pyotp.TOTP(secret).at(clock.now)
    replica_a = OtpGuard(redis_url=REDIS_URL, prefix=prefix, clock=clock)
    replica_b = OtpGuard(redis_url=REDIS_URL, prefix=prefix, clock=clock)
    assert replica_a.check("kid", secret, code)
    assert not replica_b.check("kid", secret, code)
    client = redis.Redis.from_url(REDIS_URL)
    ttl = client.ttl(f"{prefix}otp:kid:{int(clock.now // 30)}")
    client.close()
    assert 0 < ttl <= 90


# ---- rate limits --------------------------------------------------------------------------


def test_burst_is_exact_then_refused(limiter: Limiter) -> None:
    decisions = [limiter.check("k", 5, SLOW) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert all(d.limit == 5 and d.retry_after_s == 0 for d in decisions[:5])
    refused = decisions[-1]
    assert refused.retry_after_s == pytest.approx(1 / SLOW, rel=1e-3)
    assert refused.reset_s == pytest.approx(5 / SLOW, rel=1e-3)
    assert limiter.check("other", 5, SLOW).allowed  # buckets are independent


def test_redis_refill_uses_server_time(prefix: str) -> None:
    limiter = RedisLimiter(REDIS_URL, prefix=prefix)
    assert limiter.check("k", 2, 2.0).allowed and limiter.check("k", 2, 2.0).allowed
    refused = limiter.check("k", 2, 2.0)
    assert not refused.allowed and 0 < refused.retry_after_s <= 0.5
    time.sleep(refused.retry_after_s + 0.02)
    assert limiter.check("k", 2, 2.0).allowed
    assert limiter.check("slow", 10, 1.0).remaining == 9
    client = redis.Redis.from_url(REDIS_URL)
    pttl = client.pttl(f"{prefix}slow")
    client.close()
    assert 0 < pttl <= 1000  # expires when the bucket would be full again
    limiter.close()


def test_charge_goes_into_debt_down_to_minus_capacity(limiter: Limiter) -> None:
    assert limiter.check("tok", 10, SLOW).allowed
    charged = limiter.charge("tok", 10, SLOW, 25)
    assert charged.allowed and charged.remaining == 0
    assert charged.retry_after_s == pytest.approx(11 / SLOW, rel=1e-3)  # back to one token
    refused = limiter.check("tok", 10, SLOW)
    assert not refused.allowed
    assert refused.reset_s == pytest.approx(20 / SLOW, rel=1e-3)


def test_memory_and_redis_agree(prefix: str) -> None:
    memory, shared = MemoryLimiter(), RedisLimiter(REDIS_URL, prefix=prefix)
    script: list[tuple[str, float]] = [
        ("check", 3),
        ("check", 4),
        ("check", 1),
        ("charge", 5),
        ("check", 1),
        ("charge", 30),
        ("check", 0),
    ]

    def run(limiter: Limiter) -> list[tuple[bool, int]]:
        out = []
        for op, cost in script:
            d = getattr(limiter, op)("agree", 8, SLOW, cost)
            out.append((d.allowed, d.remaining))
        return out

    assert run(memory) == run(shared)
    shared.close()


def test_limiter_validates_arguments(limiter: Limiter) -> None:
    for args in [(0, 1.0, 1), (5, 0.0, 1), (5, 1.0, 6), (5, 1.0, -1)]:
        with pytest.raises(ValueError):
            limiter.check("k", *args)


def test_concurrent_threads_get_exactly_capacity(limiter: Limiter) -> None:
    def hammer(_: int) -> int:
        return sum(limiter.check("hot", 100, SLOW).allowed for _ in range(1250))

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(hammer, range(8))) == 100


def test_async_burst_gets_exactly_capacity(limiter: Limiter) -> None:
    async def burst() -> list[Decision]:
        decisions = await asyncio.gather(*(limiter.acheck("a", 100, SLOW) for _ in range(1000)))
        if isinstance(limiter, RedisLimiter):
            await limiter.aclose()
        return list(decisions)

    decisions = asyncio.run(burst())
    assert sum(d.allowed for d in decisions) == 100
    assert asyncio.run(limiter.acharge("a", 100, SLOW, 5)).remaining == 0


def test_route_limits_share_one_bucket_per_route(limiter: Limiter, prefix: str) -> None:
    routes = RouteLimits(limiter, {"/v1/chat/completions": 2.0, "/v1/embeddings": 0.5})
    chat = [routes.check("/v1/chat/completions") for _ in range(3)]
    assert [d.allowed for d in chat if d] == [True, True, False]
    assert chat[-1] is not None and 0 < chat[-1].retry_after_s <= 0.5
    embed = [asyncio.run(routes.acheck("/v1/embeddings")) for _ in range(2)]
    assert [d.allowed for d in embed if d] == [True, False]  # burst is at least one
    assert routes.check("/v1/models") is None
    if isinstance(limiter, RedisLimiter):
        client = redis.Redis.from_url(REDIS_URL)
        assert client.exists(f"{prefix}route:/v1/chat/completions")
        client.close()
    with pytest.raises(ValueError, match="/x"):
        RouteLimits(limiter, {"/x": 0})


# ---- API keys -----------------------------------------------------------------------------


def test_key_shape_and_only_a_hash_is_stored(store: KeyStore, db_url: str) -> None:
    created = store.create("ci", ["inference"])
    assert KEY_SHAPE.fullmatch(created.key) and created.key.startswith(f"dm_{created.id}_")
    assert created.totp_secret is None and created.totp_uri is None
    assert created.key not in repr(created)
    secret = created.key.split("_", 2)[2]
    (row,) = raw_rows(db_url)
    assert secret not in repr(row)
    expected = hmac.new(PEPPER, f"{created.id}:{secret}".encode(), hashlib.sha256).hexdigest()
    assert row["secret_hash"] == expected
    listed = store.list()
    assert [r.id for r in listed] == [created.id]
    assert "secret_hash" not in KeyRecord.__slots__
    record = store.get(created.id)
    assert record is not None and record.scopes == frozenset({"inference"})
    assert record.created_at.tzinfo is not None and not record.revoked
    assert store.get("nonexistent00") is None


def test_authenticate_and_the_reasons_for_refusal(store: KeyStore) -> None:
    created = store.create("svc", ["data:read"])
    record = store.authenticate(created.key)
    assert record.id == created.id and record.name == "svc"
    id_, secret = created.id, created.key.split("_", 2)[2]
    for malformed in [
        "",
        "dm_",
        created.key[3:],
        f"xx_{id_}_{secret}",
        f"dm_{id_.upper()}_{secret}",
        f"dm_{id_}x_{secret}",
        f"dm_{id_}_{secret[:20]}",
        f"dm_{id_}_{secret}!",
        f"dm_{id_}_{'a' * 300}",
        f"Bearer {created.key}",
    ]:
        assert reason(store, malformed) == "malformed", malformed
    assert reason(store, f"dm_{'0' * 12}_{secret}") == "unknown_id"
    other = "x" if secret[-1] != "x" else "y"
    assert reason(store, f"dm_{id_}_{secret[:-1]}{other}") == "bad_secret"
    with pytest.raises(AuthError) as info:
        store.authenticate(f"dm_{id_}_{'B' * 43}")
    assert info.value.key_id == id_


def test_revocation_is_immediate_here_and_within_the_ttl_elsewhere(
    store: KeyStore, db_url: str, opened: list[KeyStore]
) -> None:
    elsewhere = KeyStore(db_url, PEPPER, cache_ttl_s=1.0)
    opened.append(elsewhere)
    created = store.create("svc", ["inference"])
    store.authenticate(created.key)
    elsewhere.authenticate(created.key)
    assert store.revoke(created.id)
    assert reason(store, created.key) == "revoked"
    assert elsewhere.authenticate(created.key).id == created.id  # cached for a while
    time.sleep(1.05)
    assert reason(elsewhere, created.key) == "revoked"
    assert not store.revoke(created.id) and not store.revoke("nonexistent00")
    record = store.get(created.id)
    assert record is not None and record.revoked and record.revoked_at is not None


def test_expiry_applies_even_to_cached_keys(db_url: str, opened: list[KeyStore]) -> None:
    clock = FakeWallClock()
    store = KeyStore(db_url, PEPPER, clock=clock)
    opened.append(store)
    soon = store.create("temp", ["inference"], expires_at=clock.now + timedelta(minutes=1))
    assert store.authenticate(soon.key).expires_at == clock.now + timedelta(minutes=1)
    clock.now += timedelta(minutes=1)
    assert reason(store, soon.key) == "expired"
    past = store.create("old", ["inference"], expires_at=clock.now - timedelta(seconds=1))
    assert reason(store, past.key) == "expired"
    with pytest.raises(ValueError, match="timezone"):
        store.create("naive", ["inference"], expires_at=datetime(2031, 1, 1))


def test_unknown_id_and_wrong_secret_both_pay_for_an_hmac(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = store.create("svc", ["inference"])
    digests: list[str] = []
    compares: list[tuple[Any, Any]] = []
    real_digest, real_compare = store._digest, hmac.compare_digest

    def counting_digest(key_id: str, secret: str) -> str:
        digests.append(key_id)
        return real_digest(key_id, secret)

    def counting_compare(a: Any, b: Any) -> bool:
        compares.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(store, "_digest", counting_digest)
    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting_compare)
    secret = created.key.split("_", 2)[2]
    for presented, why in [
        (f"dm_{'z' * 12}_{secret}", "unknown_id"),
        (f"dm_{created.id}_{'C' * 43}", "bad_secret"),
    ]:
        digests.clear()
        compares.clear()
        assert reason(store, presented) == why
        assert len(digests) == 1 and len(compares) == 1
        assert len(compares[0][1]) == 64  # against a real or a dummy hash of the same size


def test_cache_is_keyed_by_a_hash_of_the_key(store: KeyStore) -> None:
    created = store.create("svc", ["inference"])
    store.authenticate(created.key)
    assert list(store._cache) == [hashlib.sha256(created.key.encode()).digest()]
    store.revoke(created.id)
    assert not store._cache


def test_scopes_cidrs_and_rate_limits(store: KeyStore) -> None:
    created = store.create(
        "scoped",
        ["data:read", "data:write"],
        ip_allowlist=["10.1.2.3/8", "2001:db8::/32"],
        rate_limit={"requests_per_minute": 60, "tokens_per_minute": 1000},
    )
    record = store.authenticate(created.key)
    assert record.ip_allowlist == ("10.0.0.0/8", "2001:db8::/32")
    assert record.rate_limit == {"requests_per_minute": 60, "tokens_per_minute": 1000}
    assert allows(record, "data:read") and not allows(record, "inference")
    admin = store.authenticate(store.create("root", ["admin"]).key)
    assert admin.rate_limit is None and admin.ip_allowlist == ()
    assert all(allows(admin, s) for s in SCOPES)
    only_rpm = store.create("rpm", ["inference"], rate_limit={"requests_per_minute": 5})
    assert store.authenticate(only_rpm.key).rate_limit == {"requests_per_minute": 5}
    with pytest.raises(ValueError, match="unknown scope"):
        allows(record, "root")
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"scopes": ["inference", "superuser"]}, "'superuser'"),
        ({"scopes": []}, "at least one scope"),
        ({"ip_allowlist": ["10.0.0.0/8", "10.0.0.300/32"]}, "'10.0.0.300/32'"),
        ({"rate_limit": {"requests_per_minute": 0}}, "requests_per_minute"),
        ({"rate_limit": {"requests_per_minute": True}}, "requests_per_minute"),
        ({"rate_limit": {"burst": 5}}, "'burst'"),
        ({"name": "  "}, "name"),
    ]
    for kwargs, message in invalid:
        args: dict[str, Any] = {"name": "bad", "scopes": ["inference"], **kwargs}
        with pytest.raises(ValueError, match=re.escape(message)):
            store.create(**args)
    assert len(store.list()) == 3


def test_totp_secret_is_recoverable_but_not_stored_in_clear(store: KeyStore, db_url: str) -> None:
    created = store.create("ops", ["admin"], totp=True)
    assert created.totp_secret and created.totp_uri
    assert created.totp_uri.startswith("otpauth://totp/")
    assert "issuer=dify-mirror" in created.totp_uri
    record = store.authenticate(created.key)
    assert record.totp_enabled and record.totp_secret == created.totp_secret
    assert created.totp_secret not in repr(record)
    assert created.totp_secret not in repr(raw_rows(db_url))
    guard = OtpGuard()
    assert guard.check(record.id, record.totp_secret, pyotp.TOTP(created.totp_secret).now())
    listed = store.list()[0]
    assert listed.totp_secret == created.totp_secret
    plain = store.authenticate(store.create("plain", ["inference"]).key)
    assert not plain.totp_enabled


def test_async_authenticate(store: KeyStore) -> None:
    created = store.create("svc", ["inference"])

    async def twice() -> tuple[KeyRecord, KeyRecord]:
        return await store.aauthenticate(created.key), await store.aauthenticate(created.key)

    first, second = asyncio.run(twice())
    assert first.id == second.id == created.id
    with pytest.raises(AuthError):
        asyncio.run(store.aauthenticate("dm_nope"))


def test_bootstrap_generates_once_and_writes_a_private_file(
    store: KeyStore, db_url: str, tmp_path: Path, opened: list[KeyStore]
) -> None:
    path = tmp_path / "state" / "secrets" / "bootstrap.key"
    key = store.ensure_bootstrap(None, path)
    assert key is not None and KEY_SHAPE.fullmatch(key)
    assert path.read_text().strip() == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    record = store.authenticate(key)
    assert record.name == "bootstrap" and record.scopes == frozenset({"admin"})
    assert store.ensure_bootstrap(None, path) is None
    restarted = KeyStore(db_url, PEPPER)
    opened.append(restarted)
    assert restarted.ensure_bootstrap(None, path) is None
    assert path.read_text().strip() == key
    assert len(restarted.list()) == 1
    assert not list(path.parent.glob(".*.tmp"))


def test_bootstrap_imports_the_env_key(store: KeyStore, tmp_path: Path) -> None:
    env_key = "dm_envkey00001a_" + "Ab-_" * 10
    path = tmp_path / "bootstrap.key"
    assert parse_key(env_key) == ("envkey00001a", "Ab-_" * 10)
    assert store.ensure_bootstrap(env_key, path) == env_key
    assert not path.exists()
    assert store.authenticate(env_key).id == "envkey00001a"
    assert store.ensure_bootstrap(env_key, path) is None


def test_a_malformed_bootstrap_key_is_refused_not_replaced(store: KeyStore, tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.key"
    with pytest.raises(ValueError, match=r"dm_<12 lowercase letters or digits>_<32\+ characters>"):
        store.ensure_bootstrap("dm_short_x", path)
    assert not path.exists() and store.list() == []


def test_bootstrap_skipped_when_an_admin_key_exists(store: KeyStore, tmp_path: Path) -> None:
    store.create("root", ["admin"])
    assert store.ensure_bootstrap(None, tmp_path / "bootstrap.key") is None
    assert not (tmp_path / "bootstrap.key").exists()


def test_bootstrap_race_between_processes_creates_one_key(
    db_url: str, tmp_path: Path, opened: list[KeyStore]
) -> None:
    replicas = [KeyStore(db_url, PEPPER) for _ in range(6)]
    opened.extend(replicas)
    barrier = threading.Barrier(len(replicas))

    def start(replica: KeyStore) -> str | None:
        barrier.wait()
        return replica.ensure_bootstrap(None, tmp_path / "bootstrap.key")

    with ThreadPoolExecutor(len(replicas)) as pool:
        results = list(pool.map(start, replicas))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert (tmp_path / "bootstrap.key").read_text().strip() == winners[0]
    assert [r.name for r in replicas[0].list()] == ["bootstrap"]


# ---- resource patterns --------------------------------------------------------------------


def test_keys_carry_resource_patterns(store: KeyStore) -> None:
    created = store.create("tenant", ["inference"], models=["support-*"], indexes=["kb-?"])
    record = store.authenticate(created.key)
    assert record.models == ("support-*",) and record.indexes == ("kb-?",)
    listed = {r.id: r for r in store.list()}[created.id]
    assert listed.models == ("support-*",) and listed.indexes == ("kb-?",)
    everything = store.authenticate(store.create("all", ["inference"]).key)
    assert everything.models is None and everything.indexes is None
    with pytest.raises(ValueError, match="admin key reaches every model"):
        store.create("root", ["admin"], models=["support-*"])
    with pytest.raises(ValueError, match="indexes: "):
        store.create("bad", ["inference"], indexes=["KB"])


_OLD_KEYS_TABLE = """CREATE TABLE api_keys (
    id VARCHAR(12) PRIMARY KEY, name VARCHAR(200) NOT NULL, secret_hash VARCHAR(64) NOT NULL,
    scopes JSON NOT NULL, created_at TIMESTAMP NOT NULL, expires_at TIMESTAMP,
    ip_allowlist JSON NOT NULL, requests_per_minute INTEGER, tokens_per_minute INTEGER,
    totp_secret_enc VARCHAR(256), revoked BOOLEAN NOT NULL, revoked_at TIMESTAMP,
    bootstrap BOOLEAN, CONSTRAINT api_keys_one_bootstrap UNIQUE (bootstrap))"""


def test_an_older_keys_table_gains_the_pattern_columns(db_url: str, opened: list[KeyStore]) -> None:
    secret = "S" * 43  # a key written by the previous release, in its table
    digest = hmac.new(PEPPER, f"oldkey000001:{secret}".encode(), hashlib.sha256).hexdigest()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text(_OLD_KEYS_TABLE))
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, name, secret_hash, scopes, created_at, ip_allowlist,"
                " revoked) VALUES ('oldkey000001', 'old', :h, '[\"inference\"]',"
                " '2030-01-01 00:00:00', '[]', false)"
            ),
            {"h": digest},
        )
    engine.dispose()
    opened.append(KeyStore(db_url, PEPPER))
    opened.append(KeyStore(db_url, PEPPER))  # a second start finds the columns there
    record = opened[0].authenticate(f"dm_oldkey000001_{secret}")
    assert record.models is None and record.indexes is None
    created = opened[1].create("new", ["inference"], models=["a-*"])
    assert opened[0].authenticate(created.key).models == ("a-*",)


# ---- second-factor lockout ----------------------------------------------------------------


def _wrong_code(secret: str, now: float) -> str:
    otp = pyotp.TOTP(secret)
    window = {otp.at(now + 30 * o) for o in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in window)


def test_wrong_codes_are_counted_across_replicas_in_redis(prefix: str) -> None:
    from dify_serving.security import totp

    clock = FakeClock(1_700_000_000.0)
    replica_a = OtpGuard(redis_url=REDIS_URL, prefix=prefix, clock=clock)
    replica_b = OtpGuard(redis_url=REDIS_URL, prefix=prefix, clock=clock)
    secret = new_secret()
    wrong = _wrong_code(secret, clock.now)
    for replica in (replica_a, replica_b, replica_a, replica_b):
        assert not replica.check("kid", secret, wrong)
    with pytest.raises(totp.OtpLocked) as locking:
        replica_b.check("kid", secret, wrong)
    assert locking.value.new
    with pytest.raises(totp.OtpLocked) as seen:
        replica_a.check("kid", secret, pyotp.TOTP(secret).at(clock.now))
    assert totp.LOCK_S - 5 < seen.value.retry_after_s <= totp.LOCK_S
    assert replica_a.check("kid2", secret, pyotp.TOTP(secret).at(clock.now))


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_parallel_guesses_cannot_outrun_the_lockout(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 codes at once: at most MAX_WRONG_CODES are compared, and the key ends locked."""
    from dify_serving.security import totp

    clock = FakeClock(1_700_000_000.0)
    if backend == "memory":
        guard = OtpGuard(MemoryReplayStore(), clock=clock)
    else:
        guard = OtpGuard(redis_url=REDIS_URL, prefix=request.getfixturevalue("prefix"), clock=clock)
    compared: list[str] = []
    real_verify = totp.verify

    def slow_verify(secret: str, code: str, **kw: Any) -> int | None:
        compared.append(code)
        time.sleep(0.02)  # every guess of the burst is being compared at the same time
        return real_verify(secret, code, **kw)

    monkeypatch.setattr(totp, "verify", slow_verify)
    secret = new_secret()
    right = pyotp.TOTP(secret).at(clock.now)
    window = {pyotp.TOTP(secret).at(clock.now + 30 * o) for o in (-1, 0, 1)}
    wrong = [c for c in (f"{n:06d}" for n in range(100)) if c not in window][:40]

    def burst(key_id: str, codes: list[str]) -> list[Any]:
        start = threading.Barrier(len(codes))

        def guess(code: str) -> Any:
            start.wait()
            try:
                return guard.check(key_id, secret, code)
            except totp.OtpLocked as locked:
                return locked

        with ThreadPoolExecutor(len(codes)) as pool:
            return list(pool.map(guess, codes))

    outcomes = burst("k", wrong)
    assert len(compared) <= totp.MAX_WRONG_CODES, len(compared)
    locks = [o for o in outcomes if isinstance(o, totp.OtpLocked)]
    assert sum(lock.new for lock in locks) == 1  # the burst locked the key, once
    assert len(locks) >= len(wrong) - totp.MAX_WRONG_CODES + 1
    assert all(o is False for o in outcomes if not isinstance(o, totp.OtpLocked))
    with pytest.raises(totp.OtpLocked) as after:
        guard.check("k", secret, right)  # the right code, sent after the burst
    assert not after.value.new and after.value.retry_after_s > totp.LOCK_S - 5

    compared.clear()  # a right code hidden in a burst of wrong ones
    mixed = [*wrong[:20], right, *wrong[20:39]]
    outcomes = burst("k2", mixed)
    assert len([c for c in compared if c != right]) <= totp.MAX_WRONG_CODES, len(compared)
    assert sum(o is True for o in outcomes) <= 1
    if isinstance(guard.store, RedisReplayStore):
        guard.store.close()


def test_each_store_step_refuses_while_the_key_is_locked(
    otp_guard: tuple[OtpGuard, FakeClock],
) -> None:
    """The lock is part of every atomic step, not a check before them."""
    from dify_serving.security import totp

    guard, clock = otp_guard
    store = guard.store
    store.reserve("k", "right")  # a right code is being compared ...
    for n in range(totp.MAX_WRONG_CODES - 1):
        store.wrong("k", f"w{n}")
    with pytest.raises(totp.OtpLocked) as locking:
        store.wrong("k", "w-last")  # ... when parallel wrong codes lock the key
    assert locking.value.new
    with pytest.raises(totp.OtpLocked) as claim:
        store.claim("k", int(clock.now // 30), "right")
    assert not claim.value.new and claim.value.retry_after_s > totp.LOCK_S - 5
    with pytest.raises(totp.OtpLocked) as late:
        store.wrong("k", "late")  # a wrong code answered meanwhile: no second lock
    assert not late.value.new
    with pytest.raises(totp.OtpLocked):
        store.reserve("k", "next")
