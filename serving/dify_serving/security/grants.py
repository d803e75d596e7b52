"""What an API key grants: scopes, resource name patterns, rate limits, and the record
that carries them.

Kept apart from the key store (`keys.py`) because the routes' scope rules, the data
plane's access checks and the admin API need these rules on every request, and none of
them should reach SQLAlchemy to learn what `admin` means. The store validates what it
saves with the same functions.

A key may be confined to models and indexes by name patterns (`support-*`): the gateway
then refuses, and hides from listings, everything else (`gateway/access.py`). No patterns
means every model and index, as for keys made before patterns existed; `admin` reaches
everything, so an admin key with patterns is refused rather than misleadingly stored.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

INFERENCE = "inference"
DATA_READ = "data:read"
DATA_WRITE = "data:write"
MODELS_ADMIN = "models:admin"
AUDIT_READ = "audit:read"
METRICS_READ = "metrics:read"
ADMIN = "admin"
#: Every scope a key may hold; `gateway/policy.py` says which routes need which.
SCOPES = (INFERENCE, DATA_READ, DATA_WRITE, MODELS_ADMIN, AUDIT_READ, METRICS_READ, ADMIN)
RATE_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute")
#: Resource patterns: names are DNS-1123 labels, patterns add the `*` and `?` wildcards.
MAX_PATTERNS = 32
MAX_PATTERN_CHARS = 63
_PATTERN = re.compile(rf"[a-z0-9*?-]{{1,{MAX_PATTERN_CHARS}}}")


def name_patterns(value: Iterable[str] | None, field: str) -> tuple[str, ...] | None:
    """Validated name patterns (sorted, no repeats); None means every name.

    ValueError names the field and the bad pattern. An empty list is refused: leaving the
    field out is how a key reaches everything, and "nothing" is no use for a key.
    """
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(f"{field}: give a list of patterns, not one string")
    items = list(value)
    if not items:
        raise ValueError(f"{field}: give at least one pattern, or leave it out for every name")
    if len(items) > MAX_PATTERNS:
        raise ValueError(f"{field}: at most {MAX_PATTERNS} patterns, got {len(items)}")
    for item in items:
        if not isinstance(item, str) or not _PATTERN.fullmatch(item):
            raise ValueError(
                f"{field}: {str(item)[:80]!r} is not a name pattern (1 to "
                f"{MAX_PATTERN_CHARS} of a-z, 0-9, '-', and the wildcards '*' and '?')"
            )
    return tuple(sorted(set(items)))


def matches(names: tuple[str, ...] | None, name: str) -> bool:
    """Whether `name` fits one of the patterns; None (no patterns) fits everything."""
    return names is None or any(fnmatch.fnmatchcase(name, p) for p in names)


def rate_limits(value: Mapping[str, int | None] | None) -> dict[str, int] | None:
    """The limits that are set, validated; None when there are none."""
    if not value:
        return None
    unknown = sorted(set(value) - set(RATE_LIMIT_FIELDS))
    if unknown:
        known = ", ".join(RATE_LIMIT_FIELDS)
        raise ValueError(f"unknown rate limit {unknown[0]!r}; known: {known}")
    limits: dict[str, int] = {}
    for name, limit in value.items():
        if limit is None:
            continue
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ValueError(f"{name} must be a positive integer, got {limit!r}")
        limits[name] = limit
    return limits or None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the gateway knows about a key; never the secret or its hash."""

    id: str
    name: str
    scopes: frozenset[str]
    created_at: datetime
    expires_at: datetime | None
    ip_allowlist: tuple[str, ...]
    rate_limit: dict[str, int] | None
    """`requests_per_minute` and/or `tokens_per_minute`, only those that are set."""
    revoked: bool
    revoked_at: datetime | None
    totp_secret: str | None = field(default=None, repr=False)
    """The TOTP seed, for `OtpGuard.check`; never serialize it into a response."""
    models: tuple[str, ...] | None = None
    """Model name patterns the key may use; None: every model."""
    indexes: tuple[str, ...] | None = None
    """Index name patterns the key may use; None: every index."""

    @property
    def totp_enabled(self) -> bool:
        return self.totp_secret is not None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def allows(record: KeyRecord, scope: str) -> bool:
    """Whether the key grants `scope`; `admin` grants every scope."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    return ADMIN in record.scopes or scope in record.scopes
