"""What a request touched (model, index, tokens), noted for its audit row.

The security middleware puts a fresh dict in `NOTES` for each request; code deep in the
data plane adds to it without threading the request through every call. A streaming
response runs in a child task that shares the same dict, so a stream's final token
counts land in the row too.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

NOTES: ContextVar[dict[str, Any] | None] = ContextVar("dify_audit_notes", default=None)


def note(**fields: Any) -> None:
    notes = NOTES.get()
    if notes is not None:
        notes.update(fields)


#: Characters of request text an audit row keeps, when the setting asks for text at all.
TEXT_CHARS = 4096
#: Set in a request's notes by the security middleware when its audit keeps request text.
WANTS_TEXT = "wants_text"


def note_text(text: str | Callable[[], str] | None) -> None:
    """The request's text (prompt, query, documents), kept only if audit text is on.

    Pass a callable when the text must be built (joined, serialised): it is called only
    when the text is kept, so the common case pays for neither.
    """
    notes = NOTES.get()
    if notes is None or not notes.get(WANTS_TEXT) or not text:
        return
    value = text() if callable(text) else text
    if value:
        notes["text"] = value[:TEXT_CHARS]


def note_usage(result: dict[str, Any]) -> None:
    """Token counts from an engine result or a stream's final item."""
    note(
        prompt_tokens=result.get("prompt_tokens"),
        completion_tokens=result.get("completion_tokens"),
    )
