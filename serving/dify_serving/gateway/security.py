"""The gateway's guard: client address, API key, scope, second factor, rate limits, audit.

One pure ASGI middleware, ahead of routing, so a refused request costs no FastAPI work
and every request, allowed or refused, leaves an audit row. The order is the order of
cheapness and of what a client may learn: address (403) → key (401, one message for
every reason, the reason only in the audit row; 429 once the address has failed too
often) → the key's own allowlist (403) → scope (403 naming it) → second factor for
sensitive routes (401/403; 429 while locked after wrong codes) → route and key rate
limits (429 with Retry-After and X-RateLimit-*; a request under its limits carries no
extra headers, which keeps the common path lean). Each guarded request gets one
`RequestContext` (`gateway/notes.py`): the admitted key goes there for the checks that
depend on the body (models, indexes, retrieval, `access.py`), and the data plane notes
the model, index and token counts there. The audit entry is built from it by field name
when the response ends, so a stream's tokens are counted. Generated tokens are
charged to the key's tokens/minute bucket afterwards (a request may overdraw it; the
next ones wait). Refusals before a key is known are counted per address and their rows
aggregated per second (`security/failures.py`). WebSocket connections are closed
(1008): the API has none, and a route added later must not bypass the guard.

Nothing here blocks on a database: keys are checked against a short-lived in-process
cache, the in-process limiter is a dict, and the audit log batches its writes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dify_serving.gateway.errors import ApiError, send_error
from dify_serving.gateway.metrics import METRICS_PATH, REFUSALS
from dify_serving.gateway.notes import REQUEST, RequestContext, note
from dify_serving.gateway.policy import Rule, rule_for
from dify_serving.options import SecurityOptions
from dify_serving.security.audit import AuditEntry, AuditShipper, AuditTrail, TextEntry
from dify_serving.security.db import database_url, unreachable
from dify_serving.security.failures import AddressFailures, RefusalLog, retry_after
from dify_serving.security.grants import KeyRecord, allows
from dify_serving.security.keys import AuthError, KeyStore
from dify_serving.security.network import Allowlist, client_ip, parse_cidrs
from dify_serving.security.ratelimit import (
    Decision,
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
    RouteLimits,
)
from dify_serving.security.secrets import Secrets, bootstrap_key, key_pepper
from dify_serving.security.totp import MAX_WRONG_CODES, OtpGuard, OtpLocked, OtpUnavailable

log = logging.getLogger(__name__)

#: Seconds a verified Authorization header is trusted without looking again; a key
#: revoked on another replica stops working within the key store's 5 s cache anyway.
RECENT_S = 1.0
RECENT_KEYS = 10_000
#: How often a replica purges audit rows past retention (the purge records itself).
PURGE_EVERY_S = 24 * 3600
_OTP_CODE = re.compile(rb"[0-9]{6}")
_SUBJECT = re.compile(rb"[A-Za-z0-9._:@+-]{1,128}")
_WANTED = frozenset(
    (b"authorization", b"x-forwarded-for", b"x-dify-otp", b"x-dify-subject", b"content-length")
)


class Refusal(ApiError):
    """The guard's answer before routing: sent by the middleware itself, and audited."""


class Guard:
    """The security components one gateway replica uses."""

    def __init__(self, config: SecurityOptions, home: Path, secrets: Secrets | None = None) -> None:
        self.config = config
        secrets = secrets or Secrets.load(home)
        secrets.require(database=config.database, redis=config.redis)
        database = secrets.database_url if config.database else None
        redis_url = secrets.redis_url if config.redis else None
        pepper = key_pepper(home)
        self.keys = KeyStore(database_url(home, database, "keys"), pepper)
        self.keys.ensure_bootstrap(bootstrap_key(home), home / "bootstrap.key")
        self.audit: AuditTrail = AuditShipper.for_home(
            database_url(home, database, "audit"),
            home,
            pepper=pepper,
            redis_url=redis_url,
            configmap=config.audit_configmap,
            checkpoint_s=config.audit_checkpoint_s,
            retention_days=config.retention_days,
            allow_short_retention=config.allow_short_retention,
        )
        self.limiter: Any = (
            RedisLimiter(redis_url, prefix="dm:rl:", fail_open=config.fail_open)
            if redis_url
            else MemoryLimiter()
        )
        self.route_limits = RouteLimits(self.limiter, config.route_limits)
        self.failures = AddressFailures(self.limiter)
        self.refusals = RefusalLog(self.audit.record)
        self._purger: asyncio.Task[None] | None = None
        # header → (key, until): skips parsing, hashing and the store's cache for a second
        self._recent: dict[bytes, tuple[KeyRecord, float]] = {}
        self.otp = OtpGuard(redis_url=redis_url)
        self.trusted = parse_cidrs(config.trusted_proxies)
        self.allowlist = Allowlist(config.ip_allowlist)

    def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
        self.refusals.flush()
        self.audit.close()

    def start_purging(self) -> None:
        """Purge audit rows past retention now and every day (idempotent: one task)."""
        if self._purger is None:
            self._purger = asyncio.get_running_loop().create_task(self._purge_daily())

    async def _purge_daily(self) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.audit.purge)
                if removed:
                    log.info("audit purge removed %d rows past retention", removed)
            except Exception as exc:  # the next day tries again
                log.warning("audit purge failed: %s", exc)
            await asyncio.sleep(PURGE_EVERY_S)

    # ---- checks -----------------------------------------------------------------------
    async def authenticate(self, headers: dict[bytes, bytes], ip: str | None = None) -> KeyRecord:
        header = headers.get(b"authorization")
        hit = self._recent.get(header) if header else None
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        key = await self._authenticate(headers, ip)
        if len(self._recent) >= RECENT_KEYS:
            self._recent.clear()
        self._recent[header] = (key, time.monotonic() + self._recent_ttl(key))  # type: ignore[index]
        return key

    def forget_keys(self) -> None:
        """Drop the recent-keys shortcut (after a revocation here)."""
        self._recent.clear()

    @staticmethod
    def _recent_ttl(key: KeyRecord) -> float:
        ttl = RECENT_S
        if key.expires_at is not None:
            ttl = min(ttl, (key.expires_at - datetime.now(UTC)).total_seconds())
        return ttl

    async def _authenticate(self, headers: dict[bytes, bytes], ip: str | None) -> KeyRecord:
        raw = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = raw.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("missing" if not raw else "malformed header")
        token = token.strip()
        blocked = self.failures.blocked_for(ip)
        if blocked:  # only keys verified here recently; the database is not asked
            known = self.keys.cached(token)
            if known is not None:
                return known
            raise _too_many_failures(ip, blocked)
        try:
            return await self.keys.aauthenticate(token)
        except Exception as exc:
            if not unreachable(exc):
                raise
            log.warning("key store unreachable: %s", type(exc).__name__)
            raise Refusal(
                503,
                "database_unavailable",
                "API keys cannot be checked now; retry shortly",
                {"Retry-After": "2"},
            ) from None

    async def admit(
        self, rule: Rule, headers: dict[bytes, bytes], ip: str | None, request: RequestContext
    ) -> KeyRecord:
        """The key of a request on `rule`, or the Refusal that says why not (any transport:
        the HTTP middleware and the gRPC servicer both ask here)."""
        if not self.allowlist.allows(ip):
            request.anonymous = True
            raise Refusal(403, "address_not_allowed", f"client address {ip} is not allowed")
        try:
            key = await self.authenticate(headers, ip)
        except Refusal as refused:  # the address failed too often, or no key store answered
            request.anonymous = True
            request.detail = (
                "auth: key store unreachable"
                if refused.status == 503
                else "auth: address blocked after repeated failures"
            )
            raise
        except AuthError as exc:
            request.anonymous = True
            request.detail = f"auth: {exc}"
            request.key_id = exc.key_id
            wait = await self.failures.failed(ip)
            if wait:
                raise _too_many_failures(ip, wait) from None
            raise Refusal(
                401,
                "unauthorized",
                "missing or invalid API key (Authorization: Bearer dm_...)",
                {"WWW-Authenticate": "Bearer"},
            ) from None
        request.key_id = key.id  # a refusal from here on is still the key's row
        if key.ip_allowlist and not _key_allowlist(key.ip_allowlist).allows(ip):
            raise Refusal(403, "address_not_allowed", f"key {key.id} may not be used from {ip}")
        missing = [s for s in rule.scopes if not allows(key, s)]
        if missing and (not rule.any_scope or len(missing) == len(rule.scopes)):
            joined = (" or " if rule.any_scope else ", ").join(missing)
            raise Refusal(403, "forbidden", f"key {key.id} lacks scope {joined} for this route")
        if rule.sensitive:
            await self.second_factor(key, headers)
        subject = headers.get(b"x-dify-subject")
        if subject is not None:
            _note_subject(subject, request)
        return key

    def client_ip(self, peer: str | None, headers: dict[bytes, bytes]) -> str | None:
        """The client's address: the peer, or what trusted proxies forwarded for it."""
        forwarded = headers.get(b"x-forwarded-for")
        if forwarded and self.trusted:
            return client_ip(peer, forwarded.decode("latin-1"), self.trusted)
        return peer  # nobody to believe but the peer

    def record(self, entry: AuditEntry, request: RequestContext) -> None:
        """The request's audit row; refusals before a key is known are aggregated. Text
        about data subjects goes with them, for the writer to seal (`audit/seal.py`)."""
        if request.anonymous:
            self.refusals.add(entry.client_ip, entry)
        elif request.subjects and request.text:
            self.audit.record(TextEntry.of(entry, request.text, request.subjects))
        else:
            self.audit.record(entry)

    async def second_factor(self, key: KeyRecord, headers: dict[bytes, bytes]) -> None:
        sent = headers.get(b"x-dify-otp")
        if sent is not None and not _OTP_CODE.fullmatch(sent.strip()):
            # whatever the key: a malformed code is a client's mistake, never ignored
            raise Refusal(422, "invalid_request", "X-Dify-OTP: a 6-digit code")
        if key.totp_secret is None:
            if self.config.require_totp_for_admin:
                raise Refusal(
                    403,
                    "second_factor_required",
                    "this operation needs a key with a second factor (TOTP); this key has none",
                )
            return
        code = headers.get(b"x-dify-otp", b"").decode("latin-1").strip()
        if not code:
            raise Refusal(401, "second_factor_required", "send the TOTP code in X-Dify-OTP")
        try:
            accepted = await self.otp.acheck(key.id, key.totp_secret, code)
        except OtpUnavailable as exc:
            log.warning("second factor unavailable for key %s: %s", key.id, exc.__cause__)
            raise Refusal(
                503,
                "second_factor_unavailable",
                "the TOTP code cannot be checked now; retry shortly",
                {"Retry-After": "2"},
            ) from None
        except OtpLocked as locked:
            seconds = retry_after(locked.retry_after_s)
            detail = (
                f"second factor locked for {seconds} s after {MAX_WRONG_CODES} wrong codes"
                if locked.new
                else f"second factor locked ({seconds} s left)"
            )
            note(detail=detail)
            raise Refusal(
                429,
                "second_factor_locked",
                f"too many wrong TOTP codes for key {key.id}; its sensitive routes are "
                f"locked for {seconds} s",
                {"Retry-After": seconds},
            ) from None
        if not accepted:
            raise Refusal(401, "second_factor_invalid", "the TOTP code is wrong or was used")

    async def limit(self, rule: Rule, key: KeyRecord) -> None:
        """Route cap, then the key's requests/minute and tokens/minute; 429 when over."""
        bucket = self.route_limits.bucket(rule.template)
        if bucket is not None:
            d = await self._check(*bucket)
            if not d.allowed:
                raise Refusal(
                    429, "rate_limited", f"{rule.template} is at its limit", _limit_headers(d)
                )
        limits = key.rate_limit or {}
        rpm = limits.get("requests_per_minute")
        if rpm:
            decision = await self._check(f"key:{key.id}:req", rpm, rpm / 60)
            if not decision.allowed:
                raise Refusal(
                    429,
                    "rate_limited",
                    f"key {key.id} is over its limit of {rpm} requests per minute",
                    _limit_headers(decision),
                )
        tpm = limits.get("tokens_per_minute")
        if tpm and rule.generates:
            tokens = await self._check(f"key:{key.id}:tok", tpm, tpm / 60, cost=0)
            if tokens.remaining <= 0:
                raise Refusal(
                    429,
                    "rate_limited",
                    f"key {key.id} is over its limit of {tpm} tokens per minute",
                    _limit_headers(tokens),
                )

    async def charge_tokens(self, key: KeyRecord, tokens: int) -> None:
        tpm = (key.rate_limit or {}).get("tokens_per_minute")
        if tpm and tokens > 0:
            try:
                await self.limiter.acharge(f"key:{key.id}:tok", tpm, tpm / 60, tokens)
            except LimiterUnavailable:
                log.warning("could not charge %d tokens to key %s", tokens, key.id)

    async def _check(self, bucket: str, capacity: int, refill: float, cost: float = 1) -> Decision:
        try:
            decision: Decision = await self.limiter.acheck(bucket, capacity, refill, cost)
            return decision
        except LimiterUnavailable as exc:
            log.warning("rate limiter unavailable for bucket %s: %s", bucket, exc)
            raise Refusal(
                503,
                "rate_limiter_unavailable",
                "rate limiting is unavailable; retry shortly",
                {"Retry-After": "2"},
            ) from None


def _too_many_failures(ip: str | None, wait_s: float) -> Refusal:
    return Refusal(
        429,
        "too_many_failures",
        f"too many failed authentications from {ip}; retry later",
        {"Retry-After": retry_after(wait_s)},
    )


@functools.lru_cache(maxsize=1024)
def _key_allowlist(cidrs: tuple[str, ...]) -> Allowlist:
    """A key's networks, parsed once (its record is cached; so is this)."""
    return Allowlist(cidrs)


def _note_subject(sent: bytes, request: RequestContext) -> None:
    """`X-Dify-Subject`: the data subject the request is about. Malformed is a client's
    mistake, refused whatever the audit keeps (as X-Dify-OTP)."""
    sent = sent.strip()
    if not _SUBJECT.fullmatch(sent):
        raise Refusal(
            422, "invalid_request", "X-Dify-Subject: 1-128 characters of A-Z a-z 0-9 . _ : @ + -"
        )
    if request.wants_text:
        request.subjects = tuple(sorted({*request.subjects, sent.decode("ascii")}))


def _limit_headers(d: Decision) -> dict[str, str]:
    headers = {
        "X-RateLimit-Limit": str(d.limit),
        "X-RateLimit-Remaining": str(max(0, int(d.remaining))),
        "X-RateLimit-Reset": str(max(0, round(d.reset_s))),
    }
    if not d.allowed or d.remaining <= 0:
        headers["Retry-After"] = str(max(1, round(d.retry_after_s + 0.499)))
    return headers


class SecurityMiddleware:
    """Pure ASGI: refuses early, audits always (see the module docstring)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._close_websocket(scope, send)
                return
            await self.app(scope, receive, send)  # lifespan
            return
        started = time.perf_counter()
        self.guard.start_purging()  # once; the first request brings the replica's loop
        rule = rule_for(scope["method"], scope["path"])
        if rule.public or (self.guard.config.metrics_public and scope["path"] == METRICS_PATH):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        request = RequestContext(wants_text=self.guard.config.record_text)
        REQUEST.set(request)
        headers = {k: v for k, v in scope["headers"] if k in _WANTED}
        ip = self._client_ip(scope, headers)
        length = headers.get(b"content-length", b"0")
        counts = {"in": int(length) if length.isdigit() else 0, "out": 0, "status": 500}
        key: KeyRecord | None = None

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            else:
                counts["status"] = message.get("status", counts["status"])
            await send(message)

        try:
            key = await self.guard.admit(rule, headers, ip, request)
            await self.guard.limit(rule, key)
            request.key = key
            await self.app(scope, receive, counting_send)
        except Refusal as r:
            REFUSALS.labels(r.code).inc()
            rid = state.get("request_id", "")
            await send_error(counting_send, r.status, r.code, r.message, rid, r.headers)
        finally:
            if key is not None and rule.generates:
                await self.guard.charge_tokens(key, int(request.completion_tokens or 0))
            entry = AuditEntry(
                time=time.time(),
                request_id=state.get("request_id", ""),
                key_id=key.id if key else request.key_id,
                client_ip=ip,
                method=scope["method"],
                route=rule.template,
                status=counts["status"],
                latency_ms=(time.perf_counter() - started) * 1000,
                model=request.model,
                index=request.index,
                prompt_tokens=request.prompt_tokens,
                completion_tokens=request.completion_tokens,
                bytes_in=counts["in"],
                bytes_out=counts["out"],
                detail=request.audit_detail(),
            )
            self.guard.record(entry, request)

    def _client_ip(self, scope: Scope, headers: dict[bytes, bytes]) -> str | None:
        peer = scope["client"][0] if scope.get("client") else None
        return self.guard.client_ip(peer, headers)

    async def _close_websocket(self, scope: Scope, send: Send) -> None:
        """Refuse the handshake (HTTP 403 on the wire) and leave an aggregated audit row."""
        await send({"type": "websocket.close", "code": 1008})
        headers = {k: v for k, v in scope["headers"] if k in _WANTED}
        ip = self._client_ip(scope, headers)
        entry = AuditEntry(
            time=time.time(),
            request_id=uuid.uuid4().hex,
            key_id=None,
            client_ip=ip,
            method="WEBSOCKET",
            route=scope.get("path", "")[:200],
            status=403,
            latency_ms=0.0,
            detail="websocket refused: the API has no WebSocket routes",
        )
        self.guard.refusals.add(ip, entry)
