"""Crypto-shredding: request text about a data subject, sealed so erasure can destroy it.

A hash-chained row cannot be edited or deleted without breaking the chain, yet an
erased subject's prompts and documents must become unreadable. So the writer stores
such text encrypted (AES-256-GCM) under a key per subject, kept apart from the rows in
`audit_text_keys`; erasure deletes the key. The row, and so the chain, never changes:
the ciphertext stays, and reads show `ERASED` where it used to decrypt.

* **Off the request path.** The gateway hands the text and subjects over as a
  `TextEntry`; the writer seals them inside the write transaction, under the chain lock
  that `shred` takes too. Keys are read per batch, not cached: a key another gateway
  replica destroyed is never used again.
* **Erasure is a time.** Destroying a key blanks it and records when (`erased`), so
  a row recorded before the erasure but written after it (another replica's writer
  still held it) is written with `ERASED` in place of its text, never sealed under a
  new key; text recorded after the erasure gets a new key. A subject erased before any
  of its text was written still gets that record.
* **Several subjects.** The text is encrypted once per subject, one layer inside the
  next, so destroying any one subject's key makes it unreadable.
* **Self-describing.** The detail's text part becomes
  `sealed:v1:<ref>[,<ref>...]:<base64url>`, outer layer first; `<ref>` is an HMAC of the
  subject under the chain key (`ChainKey.subject_ref`), so neither the key table nor the
  row names the subject. Each layer is a 12-byte nonce and the GCM output, with its ref
  as associated data.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, insert, select, update

from dify_serving.security.audit.chain import REF_CHARS, ChainKey
from dify_serving.security.audit.entry import DETAIL, TIME, Sealing
from dify_serving.security.audit.schema import TEXT_KEYS

#: What a read shows for text whose key (any one of them) was destroyed.
ERASED = "[erased]"
_PREFIX = "sealed:v1:"
_TOKEN = re.compile(
    rf"(?:^|; )({_PREFIX}([0-9a-f]{{{REF_CHARS}}}(?:,[0-9a-f]{{{REF_CHARS}}})*):([A-Za-z0-9_-]+))\Z"
)
_NONCE = 12


def seal_rows(
    conn: Connection, rows: list[tuple[Any, ...]], chain: ChainKey
) -> list[tuple[Any, ...]]:
    """`rows` with each `Sealing` in `detail` replaced by its text sealed (plain without
    subjects, `ERASED` when a subject was erased after the row was recorded); the
    subjects' keys are created on first use. The caller holds the chain lock."""
    sealings = [row[DETAIL] for row in rows if isinstance(row[DETAIL], Sealing)]
    if not sealings:
        return rows
    refs = {s: chain.subject_ref(s) for sealing in sealings for s in sealing.subjects}
    known = _keys(conn, refs.values()) if refs else {}
    erased = {ref: k.erased for ref, k in known.items() if k.erased is not None}

    def erased_since(row: tuple[Any, ...], sealing: Sealing) -> bool:
        return any(erased.get(refs[s], float("-inf")) >= row[TIME] for s in sealing.subjects)

    keys = {ref: k.key for ref, k in known.items() if k.key is not None}
    needed = {
        refs[s]
        for row in rows
        if isinstance(row[DETAIL], Sealing) and not erased_since(row, row[DETAIL])
        for s in row[DETAIL].subjects
    }
    missing = needed - keys.keys()
    if missing:
        created = {ref: AESGCM.generate_key(bit_length=256) for ref in missing}
        now = time.time()
        fresh = [ref for ref in created if ref not in known]
        if fresh:
            conn.execute(
                insert(TEXT_KEYS),
                [{"ref": ref, "key": created[ref].hex(), "created": now} for ref in fresh],
            )
        for ref in created.keys() - set(fresh):  # erased before: a new key, the time kept
            conn.execute(
                update(TEXT_KEYS)
                .where(TEXT_KEYS.c.ref == ref)
                .values(key=created[ref].hex(), created=now)
            )
        keys.update(created)
    sealed = []
    for row in rows:
        sealing = row[DETAIL]
        if isinstance(sealing, Sealing):
            if erased_since(row, sealing):
                text = ERASED
            else:
                layers = [(refs[s], keys[refs[s]]) for s in sealing.subjects]
                text = seal_text(sealing.text, layers) if layers else sealing.text
            row = (*row[:DETAIL], sealing.joined(text), *row[DETAIL + 1 :])
        sealed.append(row)
    return sealed


def seal_text(text: str, layers: list[tuple[str, bytes]]) -> str:
    """`text` encrypted under each `(ref, key)`, the first one outermost, as a token."""
    data = text.encode()
    for ref, key in reversed(layers):
        nonce = os.urandom(_NONCE)
        data = nonce + AESGCM(key).encrypt(nonce, data, ref.encode())
    encoded = base64.urlsafe_b64encode(data).decode().rstrip("=")
    return f"{_PREFIX}{','.join(ref for ref, _ in layers)}:{encoded}"


def unseal_rows(conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as read, each sealed text decrypted, or `ERASED` where a key is gone (the
    stored rows are untouched: verify reads them without this)."""
    found = []
    for row in rows:
        detail = row.get("detail")
        match = _TOKEN.search(detail) if detail and _PREFIX in detail else None
        if match is not None:
            found.append((row, match))
    if not found:
        return rows
    keys = _keys(conn, {ref for _, match in found for ref in match.group(2).split(",")})
    for row, match in found:
        text = open_token(match.group(2).split(","), match.group(3), keys)
        if text is not None:
            row["detail"] = row["detail"][: match.start(1)] + text
    return rows


@dataclass(frozen=True, slots=True)
class SubjectKey:
    key: bytes | None  # None: destroyed
    erased: float | None  # when the subject was last erased


def open_token(refs: list[str], encoded: str, keys: dict[str, SubjectKey]) -> str | None:
    """The text inside a token; `ERASED` when a key is gone or was replaced after an
    erasure; None when it does not decrypt otherwise (not a token this writer made:
    shown as stored)."""
    held = [keys.get(ref) for ref in refs]
    if any(k is None or k.key is None for k in held):
        return ERASED
    try:
        data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        for ref in refs:
            key = keys[ref].key
            assert key is not None
            data = AESGCM(key).decrypt(data[:_NONCE], data[_NONCE:], ref.encode())
        return data.decode()
    except (InvalidTag, ValueError):
        # sealed under a key an erasure destroyed, the subject's new key here since
        return ERASED if any(k is not None and k.erased is not None for k in held) else None


def destroy_key(conn: Connection, ref: str, now: float | None = None) -> int:
    """Blank one subject's key and record the erasure's time: the keys destroyed (0 or 1)."""
    now = time.time() if now is None else now
    destroyed = conn.execute(
        update(TEXT_KEYS)
        .where(TEXT_KEYS.c.ref == ref, TEXT_KEYS.c.key != "")
        .values(key="", erased=now)
    ).rowcount
    if not destroyed:  # no key (yet, or any more): the time still counts for late rows
        found = conn.execute(select(TEXT_KEYS.c.ref).where(TEXT_KEYS.c.ref == ref)).first()
        if found is None:
            conn.execute(insert(TEXT_KEYS).values(ref=ref, key="", created=now, erased=now))
        else:
            conn.execute(update(TEXT_KEYS).where(TEXT_KEYS.c.ref == ref).values(erased=now))
    return int(destroyed)


def _keys(conn: Connection, refs: Iterable[str]) -> dict[str, SubjectKey]:
    wanted = sorted(set(refs))
    rows = conn.execute(
        select(TEXT_KEYS.c.ref, TEXT_KEYS.c.key, TEXT_KEYS.c.erased).where(
            TEXT_KEYS.c.ref.in_(wanted)
        )
    )
    return {
        str(row.ref): SubjectKey(bytes.fromhex(row.key) if row.key else None, row.erased)
        for row in rows
    }
