"""Crypto-shredding: request text about a data subject, sealed so erasure can destroy it.

A hash-chained row cannot be edited or deleted without breaking the chain, yet an
erased subject's prompts and documents must become unreadable. So the writer stores
such text encrypted (AES-256-GCM) under a key per subject, kept apart from the rows in
`audit_text_keys`; erasure deletes the key. The row, and so the chain, never changes:
the ciphertext stays, and reads show `ERASED` where it used to decrypt.

* **Off the request path.** The gateway hands the text and subjects over as a
  `TextEntry`; the writer seals them inside the write transaction, under the chain lock
  that `shred` takes too, so a row is either written before a key is destroyed (and
  sealed with it) or after (with a new key). Keys are read per batch, not cached: a key
  another gateway replica destroyed is never used again.
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
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, delete, insert, select

from dify_serving.security.audit.chain import REF_CHARS, ChainKey
from dify_serving.security.audit.entry import DETAIL, Sealing
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
    subjects); the subjects' keys are created on first use. The caller holds the chain lock."""
    sealings = [row[DETAIL] for row in rows if isinstance(row[DETAIL], Sealing)]
    if not sealings:
        return rows
    refs = {s: chain.subject_ref(s) for sealing in sealings for s in sealing.subjects}
    keys = _keys(conn, refs.values()) if refs else {}
    missing = [ref for ref in set(refs.values()) if ref not in keys]
    if missing:
        created = {ref: AESGCM.generate_key(bit_length=256) for ref in missing}
        now = time.time()
        conn.execute(
            insert(TEXT_KEYS),
            [{"ref": ref, "key": key.hex(), "created": now} for ref, key in created.items()],
        )
        keys.update(created)
    sealed = []
    for row in rows:
        sealing = row[DETAIL]
        if isinstance(sealing, Sealing):
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


def open_token(refs: list[str], encoded: str, keys: dict[str, bytes]) -> str | None:
    """The text inside a token; `ERASED` when a key is gone; None when it does not
    decrypt (not a token this writer made: shown as stored)."""
    if any(ref not in keys for ref in refs):
        return ERASED
    try:
        data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        for ref in refs:
            data = AESGCM(keys[ref]).decrypt(data[:_NONCE], data[_NONCE:], ref.encode())
        return data.decode()
    except (InvalidTag, ValueError):
        return None


def destroy_key(conn: Connection, ref: str) -> int:
    """Delete one subject's key: the keys destroyed (0 or 1)."""
    return int(conn.execute(delete(TEXT_KEYS).where(TEXT_KEYS.c.ref == ref)).rowcount)


def _keys(conn: Connection, refs: Iterable[str]) -> dict[str, bytes]:
    wanted = sorted(set(refs))
    rows = conn.execute(select(TEXT_KEYS.c.ref, TEXT_KEYS.c.key).where(TEXT_KEYS.c.ref.in_(wanted)))
    return {str(row.ref): bytes.fromhex(row.key) for row in rows}
