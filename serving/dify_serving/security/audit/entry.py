"""One audit row before it is chained: the fields, in the order the chain hashes them.

Kept apart from the chain and the writer because both depend on it: the chain hashes the
values in `FIELDS` order, the writer cleans them here first. Callers build an entry by
field name; the values in order are seen only by the chain, and by the writer process
together with the names. Text is NUL-free valid UTF-8 and short fields are capped, so
one odd value cannot wedge the queue (PostgreSQL refuses NULs and oversized index keys);
an entry that cannot be stored at all (non-finite time, missing route) raises, and the
writer drops and counts it.

A `TextEntry` also carries a request's text and the data subjects it is about: not
fields (the chain never sees them, so chains written before it still verify) but what
the writer needs to seal the text under the subjects' keys (`seal.py`). `storable` hands
it on as a `Sealing` in the `detail` column, which only the writer turns into text.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_SHORT_TEXT = 512


@dataclass(slots=True)
class AuditEntry:
    """One gateway request, allowed or refused. Metadata only; `detail` only when enabled."""

    time: float
    request_id: str
    key_id: str | None
    client_ip: str | None
    method: str
    route: str
    status: int
    latency_ms: float
    model: str | None = None
    index: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    detail: str | None = None


@dataclass(slots=True)
class TextEntry(AuditEntry):
    """An entry whose request text the writer seals for `subjects` before chaining it."""

    text: str = ""
    subjects: tuple[str, ...] = ()

    @classmethod
    def of(cls, entry: AuditEntry, text: str, subjects: tuple[str, ...]) -> TextEntry:
        fields = dict(zip(FIELDS, values_of(entry), strict=True))
        return cls(**fields, text=text, subjects=subjects)


@dataclass(frozen=True, slots=True)
class Sealing:
    """What the writer puts in `detail`: the operational part, then the text sealed."""

    detail: str | None
    text: str
    subjects: tuple[str, ...]

    def joined(self, sealed: str) -> str:
        return f"{self.detail}; {sealed}" if self.detail else sealed


FIELDS = tuple(f.name for f in dataclasses.fields(AuditEntry))
#: An entry's values in `FIELDS` order (one C call: the writer process receives these
#: with the names, `ship.py`).
values_of: Callable[[AuditEntry], tuple[Any, ...]] = operator.attrgetter(*FIELDS)
COLUMNS = ("seq", *FIELDS, "prev_hash", "hash")
DETAIL = FIELDS.index("detail")
TIME = FIELDS.index("time")
_REQUIRED_TEXT = ("request_id", "method", "route")
_OPTIONAL_TEXT = ("key_id", "client_ip", "model", "index")
_OPTIONAL_INT = ("prompt_tokens", "completion_tokens", "bytes_in", "bytes_out")
FLOATS = ("time", "latency_ms")


def storable(entry: AuditEntry) -> tuple[Any, ...]:
    """The entry's column values in `FIELDS` order: typed, finite, NUL-free, capped; a
    `TextEntry`'s `detail` is the `Sealing` the writer turns into text."""
    values = _plain(entry)
    if values is None:
        row = _checked(entry)
        values = tuple(row[name] for name in FIELDS)
    if type(entry) is TextEntry and entry.text:  # no subjects: the text stays plain
        subjects = tuple(sorted({_clean(s, MAX_SHORT_TEXT) for s in entry.subjects if s}))
        sealing = Sealing(values[DETAIL], _clean(entry.text, None), subjects)
        values = (*values[:DETAIL], sealing, *values[DETAIL + 1 :])
    return values


_TEXT_FIELDS = frozenset(_REQUIRED_TEXT + _OPTIONAL_TEXT)
_INT_FIELDS = frozenset(_OPTIONAL_INT)


def _plain(entry: AuditEntry) -> tuple[Any, ...] | None:
    """The values as they are when they need no cleaning (the usual case), else None."""
    values = values_of(entry)
    for name, value in zip(FIELDS, values, strict=True):
        kind = type(value)
        if value is None:
            if name in _REQUIRED_TEXT or name in FLOATS or name == "status":
                return None
        elif kind is str:
            if name not in _TEXT_FIELDS and name != "detail":
                return None
            if (
                not value.isascii()
                or "\x00" in value
                or (name != "detail" and len(value) > MAX_SHORT_TEXT)
            ):
                return None
            if name in _REQUIRED_TEXT and not value:
                return None
        elif kind is float:
            if name not in FLOATS or not math.isfinite(value):
                return None
        elif kind is int:
            if (name not in _INT_FIELDS and name != "status") or not -(2**63) <= value < 2**63:
                return None
        else:
            return None
    return values


def _checked(entry: AuditEntry) -> dict[str, Any]:
    """The entry as column values: typed, finite, NUL-free, short fields capped."""
    row: dict[str, Any] = {name: _finite(getattr(entry, name)) for name in FLOATS}
    for name in _REQUIRED_TEXT:
        value = getattr(entry, name)
        if value is None or value == "":
            raise ValueError(f"{name} is required")
        row[name] = _clean(value, MAX_SHORT_TEXT)
    for name in _OPTIONAL_TEXT:
        row[name] = _maybe_text(getattr(entry, name), MAX_SHORT_TEXT)
    for name in _OPTIONAL_INT:
        row[name] = _maybe_int(getattr(entry, name))
    row["status"] = _int64(entry.status)
    row["detail"] = _maybe_text(entry.detail, None)
    return row


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{number} is not a finite number")
    return number


def _int64(value: Any) -> int:
    number = int(value)
    if not -(2**63) <= number < 2**63:
        raise ValueError(f"{number} does not fit in 64 bits")
    return number


def _maybe_int(value: Any) -> int | None:
    return None if value is None else _int64(value)


def _maybe_text(value: Any, cap: int | None) -> str | None:
    return None if value is None else _clean(value, cap)


def _clean(value: Any, cap: int | None) -> str:
    if type(value) is str and value.isascii() and "\x00" not in value:  # the usual case
        return value if cap is None else value[:cap]
    valid = str(value).encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return valid if cap is None else valid[:cap]
