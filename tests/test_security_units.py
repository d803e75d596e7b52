"""Security building blocks against real Redis and PostgreSQL (and SQLite): no Ray, no HTTP.

Key storage runs the same tests on SQLite and PostgreSQL; limiters run the same tests in
memory and on Redis. Redis keys use a random prefix per test and PostgreSQL a throwaway
database, both removed afterwards.
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
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import psycopg
import pyotp
import pytest
import redis
import sqlalchemy as sa
from conftest import require_service

from dify_serving.security import keys as keys_module
from dify_serving.security.db import create_engine, database_url
from dify_serving.security.keys import (
    AuthError,
    KeyRecord,
    KeyStore,
    allows,
    api_keys,
    parse_key,
)
from dify_serving.security.network import Allowlist, client_ip, parse_cidrs, parse_ip
from dify_serving.security.ratelimit import (
    Decision,
    Limiter,
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
    RouteLimits,
)
from dify_serving.security.totp import (
    MemoryReplayStore,
    OtpGuard,
    OtpUnavailable,
    RedisReplayStore,
    new_secret,
    provisioning_uri,
    verify,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
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


@pytest.fixture()
def prefix() -> Iterator[str]:
    value = f"test-{uuid.uuid4().hex[:12]}:"
    require_service("Redis", lambda: redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    stale = list(client.scan_iter(match=value + "*", count=1000))
    if stale:
        client.delete(*stale)
    client.close()


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


# ---- network ------------------------------------------------------------------------------


def test_parse_cidrs_normalizes_and_names_the_bad_one() -> None:
    nets = parse_cidrs(["10.1.2.3/8", "2001:db8::1/32", "192.168.0.7", "::ffff:10.0.0.0/104"])
    assert [str(n) for n in nets] == ["10.0.0.0/8", "2001:db8::/32", "192.168.0.7/32", "10.0.0.0/8"]
    for bad in ("10.0.0.0/33", "nonsense", "2001:db8::/129", ""):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_cidrs(["10.0.0.0/8", bad])


def test_allowlist_v4_v6_and_mapped_addresses() -> None:
    assert Allowlist([]).allows(None) and Allowlist().allows("203.0.113.9")
    allow = Allowlist(["10.0.0.0/8", "2001:db8::/32"])
    assert allow.allows("10.20.30.40")
    assert allow.allows("::ffff:10.20.30.40")  # what a dual-stack socket reports
    assert allow.allows("2001:db8:1::5")
    assert not allow.allows("11.0.0.1")
    assert not allow.allows("2001:db9::1")
    assert not allow.allows(None)
    assert not allow.allows("not-an-ip")
    assert Allowlist(["::ffff:192.0.2.0/120"]).allows("192.0.2.77")
    assert Allowlist([ip_network("192.0.2.0/24")]).allows("::ffff:192.0.2.1")
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/99'")):
        Allowlist(["10.0.0.0/99"])


def test_parse_ip_forms() -> None:
    assert str(parse_ip(" 1.2.3.4 ")) == "1.2.3.4"
    assert str(parse_ip("1.2.3.4:8080")) == "1.2.3.4"
    assert str(parse_ip("[2001:db8::1]:443")) == "2001:db8::1"
    assert str(parse_ip("::ffff:1.2.3.4")) == "1.2.3.4"
    for bad in (None, "", "unknown", "1.2.3.4:http", "[::1", "[::1]x", "1.2.3"):
        assert parse_ip(bad) is None


def test_client_ip_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    proxies = parse_cidrs(["10.0.0.0/8", "fd00::/8"])
    # An untrusted peer's header changes nothing, however it is spelled.
    for spoof in ("1.1.1.1", "10.0.0.1", "1.1.1.1, 10.0.0.2", "garbage"):
        assert client_ip("203.0.113.5", spoof, proxies) == "203.0.113.5"
    assert client_ip("10.0.0.1", None, proxies) == "10.0.0.1"
    assert client_ip("10.0.0.1", "198.51.100.7", proxies) == "198.51.100.7"
    # Walk from the right, skip our proxies, stop at the first hop we do not trust: what a
    # client wrote to the left of it ("6.6.6.6") is not believed.
    chain = "6.6.6.6, 198.51.100.7, 10.1.1.1, 10.2.2.2"
    assert client_ip("10.0.0.1", chain, proxies) == "198.51.100.7"
    assert client_ip("fd00::1", "2001:db8::9, fd00::2", proxies) == "2001:db8::9"
    assert client_ip("::ffff:10.0.0.1", "[2001:db8::9]:5000", proxies) == "2001:db8::9"
    assert client_ip("10.0.0.1", "10.9.9.9, 10.8.8.8", proxies) == "10.9.9.9"
    assert client_ip("10.0.0.1", "198.51.100.7, nonsense", proxies) == "10.0.0.1"
    assert client_ip("10.0.0.1", "198.51.100.7,,10.1.1.1", proxies) == "10.0.0.1"
    assert client_ip(None, "198.51.100.7", proxies) is None
    assert client_ip("::ffff:203.0.113.5", None, proxies) == "203.0.113.5"


# ---- TOTP ---------------------------------------------------------------------------------

# RFC 6238 appendix B, SHA-1, secret "12345678901234567890": 8-digit codes; the 6-digit
# code is the same truncation modulo 10^6, i.e. the last six digits.
RFC6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]
RFC_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"


@pytest.mark.parametrize(("t", "code8"), RFC6238_SHA1)
def test_totp_rfc6238_vectors(t: int, code8: str) -> None:
    assert verify(RFC_SECRET, code8[-6:], now=t, window=0) == t // 30
    assert verify(RFC_SECRET, code8, now=t) is None  # exactly six digits


def test_totp_window_and_shape() -> None:
    secret = new_secret()
    assert len(secret) == 32 and re.fullmatch(r"[A-Z2-7]+", secret)
    otp, now = pyotp.TOTP(secret), 1_700_000_015.0
    step = int(now // 30)
    for offset in (-1, 0, 1):
        assert verify(secret, otp.at(now + 30 * offset), now=now) == step + offset
    for offset in (-2, 2):
        code = otp.at(now + 30 * offset)
        if code not in {otp.at(now + 30 * o) for o in (-1, 0, 1)}:
            assert verify(secret, code, now=now) is None
    good = otp.at(now)
    for bad in (good[:5], good + "0", "12a456", " " + good[1:], "١٢٣٤٥٦", ""):
        assert verify(secret, bad, now=now) is None
    uri = provisioning_uri(secret, "ci bot (abc)")
    assert uri.startswith("otpauth://totp/") and "issuer=dify-mirror" in uri
    assert f"secret={secret}" in uri


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


def test_otp_redis_down_fails_closed() -> None:
    guard = OtpGuard(redis_url=DEAD_REDIS_URL)
    secret = new_secret()
    started = time.monotonic()
    with pytest.raises(OtpUnavailable):
        guard.check("kid", secret, pyotp.TOTP(secret).now())
    assert time.monotonic() - started < 1


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


def test_memory_refill_follows_the_clock() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock)
    per_minute = 60
    for _ in range(per_minute):
        assert limiter.check("k", per_minute, per_minute / 60).allowed
    refused = limiter.check("k", per_minute, 1.0)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(1.0)
    assert refused.reset_s == pytest.approx(60.0)
    clock.now += 0.5
    assert not limiter.check("k", per_minute, 1.0).allowed
    clock.now += 0.5
    assert limiter.check("k", per_minute, 1.0).allowed
    clock.now += 3600  # never more than capacity
    assert [limiter.check("k", 60, 1.0).allowed for _ in range(61)].count(True) == 60


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


def test_charge_debt_is_repaid_over_time() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock)
    limiter.charge("tok", 60, 1.0, 150)  # 60 - 150 = -90, clamped at -60
    clock.now += 60
    assert not limiter.check("tok", 60, 1.0).allowed  # back at 0
    clock.now += 1
    assert limiter.check("tok", 60, 1.0).allowed


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


@pytest.mark.parametrize("fail_open", [False, True])
def test_unreachable_redis_is_fast_and_follows_policy(fail_open: bool) -> None:
    limiter = RedisLimiter(DEAD_REDIS_URL, fail_open=fail_open)
    started = time.monotonic()
    if fail_open:
        assert limiter.check("k", 10, 1.0).allowed
        assert asyncio.run(limiter.acheck("k", 10, 1.0)).allowed
    else:
        with pytest.raises(LimiterUnavailable):
            limiter.check("k", 10, 1.0)
        with pytest.raises(LimiterUnavailable):
            asyncio.run(limiter.acheck("k", 10, 1.0))
    assert time.monotonic() - started < 1
    limiter.close()


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


def test_route_limits_setting_is_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from dify_serving.settings import Settings

    monkeypatch.setenv("DIFY_MIRROR_ROUTE_LIMITS", "/v1/models=2.5, /v1/embeddings=10")
    assert Settings().route_limits == {"/v1/models": 2.5, "/v1/embeddings": 10.0}
    monkeypatch.setenv("DIFY_MIRROR_ROUTE_LIMITS", "/v1/models=-1")
    with pytest.raises(ValueError, match="must be > 0"):
        Settings()


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
    assert all(allows(admin, s) for s in keys_module.SCOPES)
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


def test_in_memory_sqlite_works_across_threads() -> None:
    store = KeyStore("sqlite://", b"")
    created = store.create("mem", ["inference"])
    assert asyncio.run(store.aauthenticate(created.key)).id == created.id
    store.close()


# ---- resource patterns --------------------------------------------------------------------


def test_name_patterns_are_validated_and_matched() -> None:
    assert keys_module.name_patterns(None, "models") is None
    assert keys_module.name_patterns(["b-*", "a?", "b-*"], "models") == ("a?", "b-*")
    bad: list[tuple[Any, str]] = [
        ([], "at least one pattern"),
        ("support-*", "a list"),
        (["Support"], "'Support'"),
        (["../x"], "'../x'"),
        (["[a-z]*"], "'[a-z]*'"),
        (["x" * 64], "not a name pattern"),
        ([f"m{i}" for i in range(33)], "at most 32"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            keys_module.name_patterns(value, "models")
    assert keys_module.matches(None, "anything")
    assert keys_module.matches(("support-*", "demo-llm"), "support-kb")
    assert keys_module.matches(("support-*", "demo-llm"), "demo-llm")
    assert not keys_module.matches(("support-*",), "supportkb")
    assert keys_module.matches(("kb-?",), "kb-1") and not keys_module.matches(("kb-?",), "kb-10")


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


def test_an_empty_pepper_is_refused_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dify_serving.security.secrets import SecretError, key_pepper

    monkeypatch.delenv("DIFY_MIRROR_KEY_PEPPER", raising=False)
    monkeypatch.delenv("DIFY_MIRROR_KEY_PEPPER_FILE", raising=False)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "key_pepper").write_text("\n")  # truncated by a full disk, say
    with pytest.raises(SecretError, match="is empty"):
        key_pepper(tmp_path)
    mounted = tmp_path / "mounted-pepper"
    mounted.write_text("")
    monkeypatch.setenv("DIFY_MIRROR_KEY_PEPPER_FILE", str(mounted))
    with pytest.raises(SecretError, match="empty file"):
        key_pepper(tmp_path / "other")
    assert not (tmp_path / "other" / "secrets" / "key_pepper").exists()  # none made instead


# ---- second-factor lockout ----------------------------------------------------------------


def _wrong_code(secret: str, now: float) -> str:
    otp = pyotp.TOTP(secret)
    window = {otp.at(now + 30 * o) for o in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in window)


def test_wrong_codes_lock_the_second_factor_then_the_lock_ends() -> None:
    from dify_serving.security import totp

    wall = FakeClock(1_700_000_000.0)
    mono = FakeClock(5000.0)
    guard = OtpGuard(MemoryReplayStore(clock=mono), clock=wall)
    secret = new_secret()
    wrong = _wrong_code(secret, wall.now)
    for _ in range(totp.MAX_WRONG_CODES - 1):
        assert not guard.check("k", secret, wrong)
    mono.now += totp.WRONG_CODES_WINDOW_S + 1  # those four have aged out of the window
    for _ in range(totp.MAX_WRONG_CODES - 1):
        assert not guard.check("k", secret, wrong)
    with pytest.raises(totp.OtpLocked) as locking:
        guard.check("k", secret, wrong)
    assert locking.value.new and locking.value.retry_after_s == totp.LOCK_S
    right = pyotp.TOTP(secret).at(wall.now)
    mono.now += totp.LOCK_S - 1
    with pytest.raises(totp.OtpLocked) as still:
        guard.check("k", secret, right)  # even the right code, while locked
    assert not still.value.new and 0 < still.value.retry_after_s <= 1
    assert guard.check("other", secret, right)  # other keys are not affected
    mono.now += 2
    wall.now += 30
    assert guard.check("k", secret, pyotp.TOTP(secret).at(wall.now))


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


# ---- failures before a key is known -------------------------------------------------------


def test_address_failures_block_an_address_for_its_retry_time() -> None:
    from dify_serving.security.failures import AddressFailures, address_bucket

    clock = FakeClock()
    failures = AddressFailures(MemoryLimiter(clock=clock), burst=3, per_s=0.5, clock=clock)
    waits = [asyncio.run(failures.failed("203.0.113.9")) for _ in range(4)]
    assert waits[:3] == [0, 0, 0] and waits[3] == pytest.approx(2.0)
    assert failures.blocked_for("203.0.113.9") == pytest.approx(2.0)
    assert failures.blocked_for("203.0.113.10") == 0  # others are not blocked
    clock.now += 2.5
    assert failures.blocked_for("203.0.113.9") == 0
    assert address_bucket("2001:db8:1:2:aaaa::1") == address_bucket("2001:db8:1:2:bbbb::9")
    assert address_bucket("2001:db8:1:3::1") != address_bucket("2001:db8:1:2::1")
    assert address_bucket(None) == "authfail:unknown"


def test_refusals_from_one_address_become_two_rows_a_second() -> None:
    from dify_serving.security.audit_entry import FIELDS
    from dify_serving.security.failures import RefusalLog

    clock = FakeClock(1_700_000_000.0)
    rows: list[tuple[Any, ...]] = []
    log = RefusalLog(rows.append, clock=clock)

    def row(ip: str, detail: str) -> tuple[Any, ...]:
        values = dict.fromkeys(FIELDS)
        values |= {"time": clock.now, "client_ip": ip, "status": 401, "bytes_in": 10}
        values |= {"detail": detail, "method": "GET", "route": "/v1/models"}
        return tuple(values[f] for f in FIELDS)

    for i in range(500):
        clock.now += 0.001
        log.add("198.51.100.1", row("198.51.100.1", f"auth: unknown_id {i}"))
    log.add("198.51.100.2", row("198.51.100.2", "auth: missing"))
    assert len(rows) == 2  # the first of each address, at once
    clock.now += 1.0
    log.add("198.51.100.1", row("198.51.100.1", "auth: later"))
    log.flush()
    details = [dict(zip(FIELDS, r, strict=True))["detail"] for r in rows]
    assert details[:2] == ["auth: unknown_id 0", "auth: missing"]
    assert details[2].startswith("auth failures: 499 more in 1s") and "unknown_id 499" in details[2]
    assert details[3] == "auth: later" and len(rows) == 4
    summary = dict(zip(FIELDS, rows[2], strict=True))
    assert summary["key_id"] is None and summary["bytes_in"] == 4990
