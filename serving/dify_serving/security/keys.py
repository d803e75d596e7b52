"""API keys: who may call the gateway, with which scopes, from where, and how often.

A key reads `dm_<id>_<secret>`. The id is public (logs, audit, the admin listing); the
secret is shown once at creation and only `HMAC-SHA256(pepper, id:secret)` is stored, so a
leaked database alone does not yield usable keys. Authentication costs one HMAC and one
constant-time comparison whether or not the id exists (a dummy hash stands in for unknown
ids), so response times do not reveal which ids are real. The reasons a key is refused are
kept for the audit log; the HTTP layer answers 401 for all of them.

Every request authenticates, so verified records are cached in memory for `cache_ttl_s`,
keyed by the SHA-256 of the presented key (never the key itself). Revoking a key drops it
from this process's cache at once; other processes notice within the TTL. `last_used_at`
is not tracked: it would turn every request into a database write.

A key's TOTP secret has to be recoverable to check codes, so it is stored encrypted with a
keystream derived from the pepper and the key id (each id encrypts exactly one secret).
With an empty pepper that is only obfuscation and the database itself must be protected.

What a key grants (scopes, name patterns, rate limits) and the `KeyRecord` that carries
it are defined in `grants.py`; this module stores keys and checks the presented ones.

SQLAlchemy Core keeps one schema for a SQLite file (one machine) and PostgreSQL (a cluster).
Columns added since the first release are added to an existing table on start
(`ALTER TABLE ... ADD COLUMN`, nullable, so old rows mean "no restriction").
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import string
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from dify_serving.security.db import create_engine
from dify_serving.security.grants import (
    ADMIN,
    RATE_LIMIT_FIELDS,
    SCOPES,
    KeyRecord,
    name_patterns,
    rate_limits,
)
from dify_serving.security.network import parse_cidrs
from dify_serving.security.secrets import KEY_SHAPE, KEY_SHAPE_TEXT, write_private
from dify_serving.security.totp import new_secret as new_totp_secret
from dify_serving.security.totp import provisioning_uri

log = logging.getLogger(__name__)

ID_LENGTH = 12
SECRET_LENGTH = 43  # base62: ~256 bits
BOOTSTRAP_NAME = "bootstrap"

_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
# Imported keys may carry any urlsafe secret; the id never contains "_", so the split is exact.
_MAX_KEY_CHARS = 3 + ID_LENGTH + 1 + 256

AuthReason = Literal["malformed", "unknown_id", "bad_secret", "expired", "revoked"]


class AuthError(Exception):
    """A presented key was refused; `reason` is for the audit log, not the client.

    `key_id` is the id the client presented (not necessarily a real one), None if malformed.
    """

    def __init__(self, reason: AuthReason | str, key_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_id = key_id


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key: the only time its secret (and TOTP seed) can be seen."""

    id: str
    key: str = field(repr=False)
    totp_secret: str | None = field(default=None, repr=False)
    totp_uri: str | None = field(default=None, repr=False)


def parse_key(presented: str | None) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if not isinstance(presented, str) or len(presented) > _MAX_KEY_CHARS:
        return None
    match = KEY_SHAPE.fullmatch(presented)
    return (match[1], match[2]) if match else None


def _new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))


def _new_secret() -> str:
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite has no time zones)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_metadata = sa.MetaData()
api_keys = sa.Table(
    "api_keys",
    _metadata,
    sa.Column("id", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("expires_at", _UTCDateTime),
    sa.Column("ip_allowlist", sa.JSON, nullable=False),
    sa.Column("requests_per_minute", sa.Integer),
    sa.Column("tokens_per_minute", sa.Integer),
    sa.Column("totp_secret_enc", sa.String(256)),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("revoked_at", _UTCDateTime),
    sa.Column("model_patterns", sa.JSON),  # NULL: every model
    sa.Column("index_patterns", sa.JSON),  # NULL: every index
    # True on the bootstrap key, NULL elsewhere: the unique constraint admits one per database.
    sa.Column("bootstrap", sa.Boolean),
    sa.UniqueConstraint("bootstrap", name="api_keys_one_bootstrap"),
)
_PUBLIC_COLUMNS = [c for c in api_keys.c if c.name != "secret_hash"]
#: Columns added after the first release: added to an older table on start.
_ADDED_COLUMNS = ("model_patterns", "index_patterns")


def _add_missing_columns(engine: sa.Engine) -> None:
    """Bring an older `api_keys` table up to this schema (nullable columns only)."""
    present = {c["name"] for c in sa.inspect(engine).get_columns("api_keys")}
    for name in _ADDED_COLUMNS:
        if name in present:
            continue
        kind = api_keys.c[name].type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE api_keys ADD COLUMN {name} {kind}"))
        except sa.exc.DBAPIError:  # another process added it meanwhile
            if name not in {c["name"] for c in sa.inspect(engine).get_columns("api_keys")}:
                raise


class KeyStore:
    """API keys in a SQL database, with an in-memory cache of verified keys."""

    def __init__(
        self,
        url: str,
        pepper: bytes,
        *,
        cache_ttl_s: float = 5.0,
        cache_size: int = 10_000,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.engine = create_engine(url)
        self._pepper = pepper
        self._clock = clock
        self._cache_ttl_s = cache_ttl_s
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[KeyRecord, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._revocations = 0
        self._dummy_hash = secrets.token_hex(32)
        try:
            _metadata.create_all(self.engine)
        except sa.exc.DBAPIError:
            _metadata.create_all(self.engine)  # another process created it meanwhile
        _add_missing_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- hashing and sealing -------------------------------------------------------------

    def _digest(self, key_id: str, secret: str) -> str:
        return hmac.new(self._pepper, f"{key_id}:{secret}".encode(), hashlib.sha256).hexdigest()

    def _keystream(self, key_id: str, length: int) -> bytes:
        blocks = (
            hmac.new(self._pepper, f"totp:{key_id}:{i}".encode(), hashlib.sha256).digest()
            for i in range(math.ceil(length / 32))
        )
        return b"".join(blocks)[:length]

    def _xor(self, key_id: str, data: bytes) -> bytes:
        pad = self._keystream(key_id, len(data))
        return bytes(a ^ b for a, b in zip(data, pad, strict=True))

    def _seal(self, key_id: str, totp_secret: str) -> str:
        return self._xor(key_id, totp_secret.encode()).hex()

    def _unseal(self, key_id: str, sealed: str) -> str:
        return self._xor(key_id, bytes.fromhex(sealed)).decode()

    # -- rows ----------------------------------------------------------------------------

    def _row(
        self,
        key_id: str,
        secret: str,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | None = None,
        ip_allowlist: Iterable[str] = (),
        rate_limit: Mapping[str, int | None] | None = None,
        totp_secret: str | None = None,
        bootstrap: bool = False,
        models: Iterable[str] | None = None,
        indexes: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        name = name.strip()
        if not name or len(name) > 200:
            raise ValueError("name must be 1 to 200 characters")
        scope_set = frozenset(scopes)
        unknown = sorted(scope_set.difference(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope {unknown[0]!r}; known: {', '.join(sorted(SCOPES))}")
        if not scope_set:
            raise ValueError("a key needs at least one scope")
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        limits = rate_limits(rate_limit) or {}
        model_patterns = name_patterns(models, "models")
        index_patterns = name_patterns(indexes, "indexes")
        if ADMIN in scope_set and (model_patterns or index_patterns):
            raise ValueError(
                "an admin key reaches every model and index; give patterns to keys without admin"
            )
        return {
            "id": key_id,
            "name": name,
            "secret_hash": self._digest(key_id, secret),
            "scopes": sorted(scope_set),
            "created_at": self._clock(),
            "expires_at": expires_at,
            "ip_allowlist": [str(net) for net in parse_cidrs(ip_allowlist)],
            "requests_per_minute": limits.get("requests_per_minute"),
            "tokens_per_minute": limits.get("tokens_per_minute"),
            "totp_secret_enc": self._seal(key_id, totp_secret) if totp_secret else None,
            "revoked": False,
            "revoked_at": None,
            "bootstrap": True if bootstrap else None,
            "model_patterns": list(model_patterns) if model_patterns else None,
            "index_patterns": list(index_patterns) if index_patterns else None,
        }

    def _record(self, row: Any) -> KeyRecord:
        m = row._mapping
        sealed = m["totp_secret_enc"]
        return KeyRecord(
            id=m["id"],
            name=m["name"],
            scopes=frozenset(m["scopes"]),
            created_at=m["created_at"],
            expires_at=m["expires_at"],
            ip_allowlist=tuple(m["ip_allowlist"]),
            rate_limit=rate_limits({f: m[f] for f in RATE_LIMIT_FIELDS}),
            revoked=bool(m["revoked"]),
            revoked_at=m["revoked_at"],
            totp_secret=self._unseal(m["id"], sealed) if sealed else None,
            models=tuple(m["model_patterns"]) if m["model_patterns"] else None,
            indexes=tuple(m["index_patterns"]) if m["index_patterns"] else None,
        )

    # -- administration ------------------------------------------------------------------

    def create(
        self,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | None = None,
        ip_allowlist: Iterable[str] = (),
        rate_limit: Mapping[str, int | None] | None = None,
        totp: bool = False,
        models: Iterable[str] | None = None,
        indexes: Iterable[str] | None = None,
    ) -> CreatedKey:
        """A new key; ValueError for an unknown scope, a bad CIDR, rate limit or pattern."""
        key_id, secret = _new_id(), _new_secret()
        totp_secret = new_totp_secret() if totp else None
        row = self._row(
            key_id,
            secret,
            name,
            scopes,
            expires_at,
            ip_allowlist,
            rate_limit,
            totp_secret,
            models=models,
            indexes=indexes,
        )
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(row))
        return CreatedKey(
            id=key_id,
            key=f"dm_{key_id}_{secret}",
            totp_secret=totp_secret,
            totp_uri=provisioning_uri(totp_secret, f"{row['name']} ({key_id})")
            if totp_secret
            else None,
        )

    def list(self) -> list[KeyRecord]:
        """Every key, oldest first (records carry TOTP seeds: see `KeyRecord`)."""
        query = sa.select(*_PUBLIC_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id)
        with self.engine.connect() as conn:
            return [self._record(row) for row in conn.execute(query)]

    def get(self, key_id: str) -> KeyRecord | None:
        query = sa.select(*_PUBLIC_COLUMNS).where(api_keys.c.id == key_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return self._record(row) if row else None

    def revoke(self, key_id: str) -> bool:
        """Revoke a key; False when it does not exist or was already revoked."""
        query = (
            api_keys.update()
            .where(api_keys.c.id == key_id, api_keys.c.revoked.is_(False))
            .values(revoked=True, revoked_at=self._clock())
        )
        with self.engine.begin() as conn:
            changed = conn.execute(query).rowcount == 1
        with self._lock:
            self._revocations += 1
            for fingerprint in [f for f, (rec, _) in self._cache.items() if rec.id == key_id]:
                del self._cache[fingerprint]
        return changed

    def _has_admin(self) -> bool:
        query = sa.select(api_keys.c.scopes, api_keys.c.expires_at, api_keys.c.bootstrap).where(
            api_keys.c.revoked.is_(False) | api_keys.c.bootstrap.is_(True)
        )
        now = self._clock()
        with self.engine.connect() as conn:
            for scopes, expires_at, bootstrap in conn.execute(query):
                if bootstrap or ("admin" in scopes and (expires_at is None or now < expires_at)):
                    return True
        return False

    def ensure_bootstrap(self, key: str | None, path: Path) -> str | None:
        """Create the first admin key unless one exists; the new key string, else None.

        `key` (DIFY_MIRROR_BOOTSTRAP_KEY) is imported as is when well-formed; otherwise a
        key is generated and written to `path` (mode 0600). At most one bootstrap key ever
        exists per database, whichever process wins the insert, and revoking it is final.
        """
        parts = parse_key(key) if key else None
        if key and parts is None:
            raise ValueError(f"DIFY_MIRROR_BOOTSTRAP_KEY must look like {KEY_SHAPE_TEXT}")
        if self._has_admin():
            return None
        key_id, secret = parts if parts else (_new_id(), _new_secret())
        row = self._row(key_id, secret, BOOTSTRAP_NAME, {"admin"}, bootstrap=True)
        presented = f"dm_{key_id}_{secret}"
        try:
            with self.engine.begin() as conn:
                conn.execute(api_keys.insert().values(row))
                if parts is None:
                    write_private(path, presented + "\n")
        except sa.exc.IntegrityError:
            return None
        return presented

    # -- the hot path --------------------------------------------------------------------

    def cached(self, presented: str) -> KeyRecord | None:
        """The record of `presented` if this process verified it recently; never the database.

        Lets the gateway admit known keys while it refuses an address that keeps failing
        before that address can make it query the database.
        """
        if parse_key(presented) is None:
            return None
        record = self._from_cache(hashlib.sha256(presented.encode()).digest())
        return None if record is None else self._admit(record)

    def _from_cache(self, fingerprint: bytes) -> KeyRecord | None:
        with self._lock:
            hit = self._cache.get(fingerprint)
            if hit is None:
                return None
            if hit[1] <= time.monotonic():
                del self._cache[fingerprint]
                return None
            return hit[0]

    def _remember(self, fingerprint: bytes, record: KeyRecord, revocations: int) -> None:
        with self._lock:
            if revocations != self._revocations:
                return  # a revocation may have raced with the read; do not cache it
            self._cache[fingerprint] = (record, time.monotonic() + self._cache_ttl_s)
            self._cache.move_to_end(fingerprint)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _admit(self, record: KeyRecord) -> KeyRecord:
        if record.expired(self._clock()):
            raise AuthError("expired", record.id)
        return record

    def _verify(self, key_id: str, secret: str) -> KeyRecord:
        query = sa.select(api_keys).where(api_keys.c.id == key_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        expected = row._mapping["secret_hash"] if row else self._dummy_hash
        matches = hmac.compare_digest(self._digest(key_id, secret), expected)
        if row is None:
            raise AuthError("unknown_id", key_id)
        if not matches:
            raise AuthError("bad_secret", key_id)
        record = self._record(row)
        if record.revoked:
            raise AuthError("revoked", key_id)
        return record

    def authenticate(self, presented: str) -> KeyRecord:
        """The record of a valid key; AuthError(reason) otherwise. Blocks on a cache miss."""
        parts = parse_key(presented)
        if parts is None:
            raise AuthError("malformed")
        fingerprint = hashlib.sha256(presented.encode()).digest()
        record = self._from_cache(fingerprint)
        if record is None:
            revocations = self._revocations
            record = self._verify(*parts)
            self._remember(fingerprint, record, revocations)
        return self._admit(record)

    async def aauthenticate(self, presented: str) -> KeyRecord:
        """`authenticate` for the event loop: cache hits inline, database work in a thread."""
        if parse_key(presented) is None:
            raise AuthError("malformed")
        record = self._from_cache(hashlib.sha256(presented.encode()).digest())
        if record is not None:
            return self._admit(record)
        return await asyncio.to_thread(self.authenticate, presented)
