"""The filter language of a search, validated once into a backend-neutral `StoreFilter`.

Filter language (JSON, several keys = AND):
    {"lang": "en"}                 exact match (string, integer or boolean)
    {"lang": ["en", "de"]}         any of (all strings or all integers)
    {"year": {"gte": 2020, "lt": 2024}}   range (gt/gte/lt/lte, numbers)
`document_id` and `subject_id` address the point's own fields; every other name must be
one of the index's `filterableFields` and addresses the user's metadata, i.e. the
payload key `metadata.<name>`. `build_filter` validates the JSON once into a
`StoreFilter`, which each backend translates with `translate`: a filter is refused the
same way whichever backend holds the index, and no Qdrant binding is loaded to refuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dify_serving.knowledge.errors import InvalidFilter, UnknownFilterField

#: Fields of every point that filters may address directly (not under `metadata`).
POINT_FIELDS = ("document_id", "subject_id")

_RANGE_OPS = ("gt", "gte", "lt", "lte")


@dataclass(frozen=True, slots=True)
class Match:
    key: str
    value: str | int | bool


@dataclass(frozen=True, slots=True)
class MatchAny:
    key: str
    values: tuple[str, ...] | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Range:
    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    @property
    def bounds(self) -> dict[str, float | None]:
        """gt/gte/lt/lte as keyword arguments for a backend's range type."""
        return {"gt": self.gt, "gte": self.gte, "lt": self.lt, "lte": self.lte}


Condition = Match | MatchAny | Range


@dataclass(frozen=True, slots=True)
class StoreFilter:
    """Conditions on payload keys: all of `must`, none of `must_not`."""

    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


def translate(
    flt: StoreFilter | None, condition: Callable[[Condition], Any], make: Callable[..., Any]
) -> Any:
    """A backend's filter for `flt` (None stays None): `make(must=…, must_not=…)` over the
    conditions as `condition` translates them."""
    if flt is None:
        return None
    return make(
        must=[condition(c) for c in flt.must] or None,
        must_not=[condition(c) for c in flt.must_not] or None,
    )


def payload_key(field: str) -> str:
    """Where a filter field lives in the payload."""
    return field if field in POINT_FIELDS else f"metadata.{field}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _condition(field: str, value: Any) -> Condition:
    key = payload_key(field)
    if isinstance(value, str | int | bool):
        return Match(key, value)
    if isinstance(value, list | tuple):
        if not value:
            raise InvalidFilter(f"{field}: an empty list matches nothing")
        if all(isinstance(v, str) for v in value):
            return MatchAny(key, tuple(value))
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return MatchAny(key, tuple(value))
        raise InvalidFilter(f"{field}: a list must hold only strings or only integers")
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in _RANGE_OPS)
        if unknown or not value:
            raise InvalidFilter(
                f"{field}: a range takes {', '.join(_RANGE_OPS)}; got {unknown or 'nothing'}"
            )
        if not all(_is_number(v) for v in value.values()):
            raise InvalidFilter(f"{field}: range bounds must be numbers")
        return Range(key, **{op: float(v) for op, v in value.items()})
    if isinstance(value, float):
        raise InvalidFilter(f"{field}: exact match needs a string, integer or boolean")
    raise InvalidFilter(f"{field}: unsupported value {value!r}")


def build_filter(
    filter: Mapping[str, Any] | None, allowed: set[str] | frozenset[str]
) -> StoreFilter | None:
    """Validate the user's JSON filter against `allowed` fields; None when empty.

    Raises:
        UnknownFilterField: a name outside `allowed`.
        InvalidFilter: a malformed value (both are 422 `invalid_filter`).
    """
    if filter is None:
        return None
    if not isinstance(filter, Mapping):
        raise InvalidFilter("a filter is an object of field: condition")
    conditions = []
    for name, value in filter.items():
        if name not in allowed:
            raise UnknownFilterField(str(name), allowed)
        conditions.append(_condition(name, value))
    return StoreFilter(must=tuple(conditions)) if conditions else None
