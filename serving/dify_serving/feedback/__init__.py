"""Users' ratings of the answers they got: stored per key with the model and version that
answered (`store`), checked against the request's audit row (`served`).

Layered beside `tasks`: it reads the audit table and opens databases the way the keys,
audit and task stores do (`security/db.py`); the gateway's data plane is its only caller.
"""

from dify_serving.feedback.served import AuditedRequest, ServedRequests
from dify_serving.feedback.store import (
    MAX_COMMENT_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_SUBJECT_CHARS,
    RATINGS,
    Feedback,
    FeedbackStore,
    Kind,
    Satisfaction,
    Tally,
    score,
    split_model,
    sqlite_path,
)

__all__ = [
    "MAX_COMMENT_CHARS",
    "MAX_REQUEST_ID_CHARS",
    "MAX_SUBJECT_CHARS",
    "RATINGS",
    "AuditedRequest",
    "Feedback",
    "FeedbackStore",
    "Kind",
    "Satisfaction",
    "ServedRequests",
    "Tally",
    "score",
    "split_model",
    "sqlite_path",
]
