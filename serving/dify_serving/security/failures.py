"""Refusals before a key is known: a budget per client address, and audit rows that add up.

A storm of random keys costs the gateway one database lookup per key (the key store
cannot cache what it has never seen) and one audit row per request. Both are bounded
per client address here, touched only when a request fails, so the admitted path pays
nothing:

- `AddressFailures` charges each failed authentication to a token bucket of the address
  (in the gateway's limiter, so Redis shares it across replicas). Once the bucket is
  empty the address is blocked in this process for the bucket's retry time: a request
  from it whose key is not already verified here is refused with 429 before the key
  store is asked, while keys this replica verified recently keep working (a NAT'd office
  is not locked out by one broken client). IPv6 addresses count by /64, the block one
  subscriber usually holds.
- `RefusalLog` writes the first refusal from an address in each second as its own row
  and the rest of that second as one row with a count, so the audit table grows by at
  most two rows per address per second however fast the refusals come.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from dify_serving.security.audit.entry import AuditEntry
from dify_serving.security.ratelimit import Limiter, LimiterUnavailable

log = logging.getLogger(__name__)

#: Failed authentications an address may make at once, and how fast it earns more.
AUTH_FAILURE_BURST = 20
AUTH_FAILURES_PER_S = 1.0
#: Seconds over which refusals from one address become one audit row.
REFUSAL_WINDOW_S = 1.0
#: Addresses tracked before expired entries are pruned (bounds memory under a storm).
_PRUNE_AT = 4096


def address_bucket(ip: str | None) -> str:
    """The bucket an address's failures count against: the address, or its IPv6 /64."""
    if not ip:
        return "authfail:unknown"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "authfail:" + ip[:64]
    if isinstance(addr, ipaddress.IPv6Address):
        return f"authfail:{ipaddress.IPv6Network((addr, 64), strict=False)}"
    return f"authfail:{addr}"


class AddressFailures:
    """Failed authentications per client address (see the module docstring)."""

    def __init__(
        self,
        limiter: Limiter,
        *,
        burst: int = AUTH_FAILURE_BURST,
        per_s: float = AUTH_FAILURES_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.burst = burst
        self.per_s = per_s
        self._clock = clock
        self._blocked: dict[str, float] = {}  # bucket → monotonic time the block ends

    def blocked_for(self, ip: str | None) -> float:
        """Seconds this address stays blocked here (0: not blocked); no I/O."""
        if not self._blocked:
            return 0.0
        until = self._blocked.get(address_bucket(ip))
        return 0.0 if until is None else max(0.0, until - self._clock())

    async def failed(self, ip: str | None) -> float:
        """Charge one failure; the seconds to wait when the address is over its budget."""
        bucket = address_bucket(ip)
        try:
            decision = await self.limiter.acheck(bucket, self.burst, self.per_s)
        except LimiterUnavailable as exc:  # the 401 stands; the budget is best effort
            log.warning("cannot count a failed authentication: %s", exc)
            return 0.0
        if decision.allowed:
            return 0.0
        now = self._clock()
        if len(self._blocked) >= _PRUNE_AT:
            self._blocked = {k: v for k, v in self._blocked.items() if v > now}
        wait = max(decision.retry_after_s, 1.0 / self.per_s)
        self._blocked[bucket] = now + wait
        return wait


@dataclass(slots=True)
class _Window:
    start: float
    more: int = 0
    bytes_in: int = 0
    last: AuditEntry | None = None


class RefusalLog:
    """Audit rows for refusals before a key is known, at most two per address per second."""

    def __init__(
        self,
        record: Callable[[AuditEntry], None],
        *,
        window_s: float = REFUSAL_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._record = record
        self.window_s = window_s
        self._clock = clock
        self._open: dict[str, _Window] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def add(self, ip: str | None, entry: AuditEntry) -> None:
        """Record `entry`, or count it into its address's second."""
        now = self._clock()
        address = ip or "unknown"
        window = self._open.get(address)
        if window is not None and now - window.start < self.window_s:
            window.more += 1
            window.bytes_in += int(entry.bytes_in or 0)
            window.last = entry
            return
        if window is not None:
            self._emit(self._open.pop(address))
        self.flush(due_only=True)
        self._open[address] = _Window(start=now)
        self._record(entry)
        self._schedule()

    def flush(self, due_only: bool = False) -> None:
        """Write the count rows of finished seconds (all of them unless `due_only`)."""
        now = self._clock()
        while self._open:  # oldest first: windows are opened in time order
            address, window = next(iter(self._open.items()))
            if due_only and now - window.start < self.window_s:
                return
            self._emit(self._open.pop(address))

    def _emit(self, window: _Window) -> None:
        last = window.last
        if not window.more or last is None:
            return
        summary = dataclasses.replace(
            last,
            time=window.start + self.window_s,
            request_id=uuid.uuid4().hex,
            key_id=None,
            latency_ms=0.0,
            bytes_in=window.bytes_in,
            detail=f"auth failures: {window.more} more in {self.window_s:g}s from this address "
            f"(last: {last.detail or f'status {last.status}'})",
        )
        self._record(summary)

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: the next refusal or `flush()` writes the counts
            return
        if self._timer is None or self._timer_loop is not loop:  # none, or a finished loop's
            self._timer, self._timer_loop = loop.call_later(self.window_s, self._tick), loop

    def _tick(self) -> None:
        self._timer = None
        self.flush(due_only=True)
        if self._open:
            self._schedule()


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))
