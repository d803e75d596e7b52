"""The request being served: the key the guard admitted, and what the request touched.

The security middleware puts one `RequestContext` in `REQUEST` for each request it
guards; code deep in the data plane reads the key (`access.py`) and notes the model,
index, tokens and text for the audit row (below) without threading the request through
every call. Text about a data subject (a document's `subject_id`, the `X-Dify-Subject`
header) is noted with its subjects, so the audit can seal it under keys that erasure
destroys. A streaming response runs in a child task that shares the same object, so a
stream's final token counts land in the row too. With security off there is no context:
every check allows and every note is dropped.

One slots object rather than a dict per concern: the middleware allocates it once, and
builds the audit entry from its attributes by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from dify_serving.security.grants import KeyRecord

#: Characters of request text an audit row keeps, when the setting asks for text at all.
TEXT_CHARS = 4096
#: What `note` may set: the audit row's fields the data plane knows (never the key).
NOTE_FIELDS = frozenset(("model", "index", "prompt_tokens", "completion_tokens", "detail"))


class RequestContext:
    """One guarded request: its admitted `key` (None until admitted) and its audit notes."""

    __slots__ = (
        "anonymous",
        "completion_tokens",
        "detail",
        "index",
        "key",
        "key_id",
        "model",
        "prompt_tokens",
        "subjects",
        "text",
        "wants_text",
    )

    def __init__(self, key: KeyRecord | None = None, *, wants_text: bool = False) -> None:
        self.key = key
        #: The audit row may keep the request's text (`note_text`).
        self.wants_text = wants_text
        #: The presented key id when authentication failed (the row still names it).
        self.key_id: str | None = None
        #: Refused before a key was known: the row is aggregated per address.
        self.anonymous = False
        self.model: str | None = None
        self.index: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.detail: str | None = None
        self.text: str | None = None
        #: The data subjects the text is about (`note_subjects`): the audit writer seals
        #: the text under their keys, which erasing one of them destroys.
        self.subjects: tuple[str, ...] = ()

    def audit_detail(self) -> str | None:
        """Operational detail, then the request's text when the audit keeps it in clear
        (about no subject; the text about subjects travels apart, to be sealed)."""
        detail, text = self.detail, self.text
        if not text or self.subjects:
            return detail or None
        return f"{detail}; {text}" if detail else text


REQUEST: ContextVar[RequestContext | None] = ContextVar("dify_request", default=None)


def note(**fields: Any) -> None:
    """Set audit fields of the current request (`NOTE_FIELDS`); no-op without security."""
    request = REQUEST.get()
    if request is None:
        return
    for name, value in fields.items():
        if name not in NOTE_FIELDS:
            raise TypeError(f"note() takes only {', '.join(sorted(NOTE_FIELDS))}, not {name!r}")
        setattr(request, name, value)


def note_text(text: str | Callable[[], str] | None) -> None:
    """The request's text (prompt, query, documents), kept only if audit text is on.

    Pass a callable when the text must be built (joined, serialised): it is called only
    when the text is kept, so the common case pays for neither.
    """
    request = REQUEST.get()
    if request is None or not request.wants_text or not text:
        return
    value = text() if callable(text) else text
    if value:
        request.text = value[:TEXT_CHARS]


def note_subjects(subjects: Iterable[str | None]) -> None:
    """The data subjects the request's text is about; kept only if audit text is on."""
    request = REQUEST.get()
    if request is None or not request.wants_text:
        return
    added = {s for s in subjects if s} - set(request.subjects)
    if added:
        request.subjects = tuple(sorted((*request.subjects, *added)))


def note_usage(result: dict[str, Any]) -> None:
    """Token counts from an engine result or a stream's final item."""
    note(
        prompt_tokens=result.get("prompt_tokens"),
        completion_tokens=result.get("completion_tokens"),
    )
