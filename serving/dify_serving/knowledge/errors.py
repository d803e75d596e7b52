"""What a vector backend refuses, as `DifyError`s: the index replica raises them as they are.

Each class fixes its HTTP status and code, so the deployment needs no mapping and a
client sees the same answer from either backend. A bare `StoreError` is a fault of the
backend or of the code calling it, never of a request: 500 `index_error`, like any other
failure of an index replica.
"""

from __future__ import annotations

from typing import ClassVar

from dify_serving.errors import DifyError


class StoreError(DifyError):
    """A vector backend refused or failed an operation."""

    _status: ClassVar[int] = 500
    _code: ClassVar[str] = "index_error"

    def __init__(self, message: str) -> None:
        super().__init__(self._status, self._code, message)


class DimensionMismatch(StoreError):
    """Vectors of one size met a collection holding another (the index's model changed)."""

    _status = 409
    _code = "dimension_mismatch"

    def __init__(self, collection: str, existing: int, requested: int) -> None:
        super().__init__(
            f"collection {collection!r} holds {existing}-dimensional vectors; "
            f"got {requested}-dimensional ones"
        )
        self.existing = existing
        self.requested = requested


class InvalidFilter(StoreError):
    """A search filter is malformed; the message says which part and why."""

    _status = 422
    _code = "invalid_filter"

    def __init__(self, message: str) -> None:
        super().__init__(f"filter: {message}")


class UnknownFilterField(InvalidFilter):
    """A filter names a field that is not filterable (the message lists those that are)."""

    def __init__(self, field: str, allowed: set[str] | frozenset[str]) -> None:
        super().__init__(
            f"unknown filter field {field!r}; filterable fields: {', '.join(sorted(allowed))}"
        )
        self.field = field
        self.allowed = frozenset(allowed)
