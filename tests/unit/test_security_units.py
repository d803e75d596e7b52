"""Security building blocks with no service behind them: networks, TOTP, in-memory limits
and lockouts, peppers. No Ray, no HTTP.

The same blocks against real Redis and PostgreSQL (and SQLite), key storage and limiters
included, are `tests/services/test_security_units.py`.
"""

from __future__ import annotations

import asyncio
import re
import time
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pyotp
import pytest

from dify_serving.security.grants import matches, name_patterns
from dify_serving.security.keys import KeyStore
from dify_serving.security.network import Allowlist, client_ip, parse_cidrs, parse_ip
from dify_serving.security.ratelimit import (
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
)
from dify_serving.security.totp import (
    MemoryReplayStore,
    OtpGuard,
    OtpUnavailable,
    new_secret,
    provisioning_uri,
    verify,
)

DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


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


# RFC 6238 appendix B, SHA-1, secret "12345678901234567890": 8-digit codes; the 6-digit
# code is the same truncation modulo 10^6, i.e. the last six digits.
# ---- TOTP ---------------------------------------------------------------------------------


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


def test_otp_redis_down_fails_closed() -> None:
    guard = OtpGuard(redis_url=DEAD_REDIS_URL)
    secret = new_secret()
    started = time.monotonic()
    with pytest.raises(OtpUnavailable):
        guard.check("kid", secret, pyotp.TOTP(secret).now())
    assert time.monotonic() - started < 1


# ---- rate limits --------------------------------------------------------------------------


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


def test_charge_debt_is_repaid_over_time() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock)
    limiter.charge("tok", 60, 1.0, 150)  # 60 - 150 = -90, clamped at -60
    clock.now += 60
    assert not limiter.check("tok", 60, 1.0).allowed  # back at 0
    clock.now += 1
    assert limiter.check("tok", 60, 1.0).allowed


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


def test_route_limits_setting_is_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from dify_serving.settings import Settings

    monkeypatch.setenv("DIFY_MIRROR_ROUTE_LIMITS", "/v1/models=2.5, /v1/embeddings=10")
    assert Settings().route_limits == {"/v1/models": 2.5, "/v1/embeddings": 10.0}
    monkeypatch.setenv("DIFY_MIRROR_ROUTE_LIMITS", "/v1/models=-1")
    with pytest.raises(ValueError, match="must be > 0"):
        Settings()


# ---- API keys -----------------------------------------------------------------------------


def test_in_memory_sqlite_works_across_threads() -> None:
    store = KeyStore("sqlite://", b"")
    created = store.create("mem", ["inference"])
    assert asyncio.run(store.aauthenticate(created.key)).id == created.id
    store.close()


# ---- resource patterns --------------------------------------------------------------------


def test_name_patterns_are_validated_and_matched() -> None:
    assert name_patterns(None, "models") is None
    assert name_patterns(["b-*", "a?", "b-*"], "models") == ("a?", "b-*")
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
            name_patterns(value, "models")
    assert matches(None, "anything")
    assert matches(("support-*", "demo-llm"), "support-kb")
    assert matches(("support-*", "demo-llm"), "demo-llm")
    assert not matches(("support-*",), "supportkb")
    assert matches(("kb-?",), "kb-1") and not matches(("kb-?",), "kb-10")


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
    from dify_serving.security.audit import AuditEntry
    from dify_serving.security.failures import RefusalLog

    clock = FakeClock(1_700_000_000.0)
    rows: list[AuditEntry] = []
    log = RefusalLog(rows.append, clock=clock)

    def row(ip: str, detail: str) -> AuditEntry:
        return AuditEntry(
            time=clock.now,
            request_id="",
            key_id="presented",
            client_ip=ip,
            method="GET",
            route="/v1/models",
            status=401,
            latency_ms=0.5,
            bytes_in=10,
            detail=detail,
        )

    for i in range(500):
        clock.now += 0.001
        log.add("198.51.100.1", row("198.51.100.1", f"auth: unknown_id {i}"))
    log.add("198.51.100.2", row("198.51.100.2", "auth: missing"))
    assert len(rows) == 2  # the first of each address, at once
    clock.now += 1.0
    log.add("198.51.100.1", row("198.51.100.1", "auth: later"))
    log.flush()
    details = [r.detail or "" for r in rows]
    assert details[:2] == ["auth: unknown_id 0", "auth: missing"]
    assert details[2].startswith("auth failures: 499 more in 1s") and "unknown_id 499" in details[2]
    assert details[3] == "auth: later" and len(rows) == 4
    summary = rows[2]
    assert summary.key_id is None and summary.bytes_in == 4990
    assert summary.time == rows[0].time + 1.0 and summary.latency_ms == 0.0
