"""One error type for every layer: `DifyError(status, code, message)`.

Engines, vector stores and the gateway raise subclasses of it; the transports map it to
their wire in one place each (`gateway/errors.py` for HTTP, the gRPC servicer later).
`status` is an HTTP status because that is the vocabulary every caller already speaks;
`code` is the stable machine-readable reason; `message` is safe to show a client (never
an internal exception's text or a server path).

An error crosses process boundaries (a Ray replica raises it, the gateway reads it), so
it pickles by its attributes, whatever a subclass's constructor takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class DifyError(Exception):
    """A refusal or failure a client may see: HTTP-style `status`, `code`, `message`."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers) if headers else None

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # subclasses take other constructor arguments; rebuild from the attributes
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[DifyError], args: tuple[Any, ...], state: dict[str, Any]) -> DifyError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error
