"""The audit trail: one row per gateway request, tamper-evident, written off the request path.

One module per job, each importable alone and none importing another's internals:

* `entry`: one row before it is chained, cleaned so one odd value cannot wedge a batch;
* `chain`: the keyed hash chain, appended under a lock, purged as a prefix with an anchor;
* `verify`: how a stored chain and its checkpoints are judged (pure functions);
* `checkpoint`: the places outside the database that keep the chain's head;
* `schema`: the tables and how each backend opens the transactions the chain needs;
* `writer`: the queue and thread that turn entries into rows, riding out outages;
* `query`: filters, keyset pages with opaque cursors, JSONL and spreadsheet-safe CSV;
* `seal`: a data subject's request text encrypted under a key that erasure destroys;
* `log`: `AuditLog`, which composes them; `ship`: `AuditShipper`, which moves the
  writing into a child process for the gateway; `trail`: `AuditTrail`, the Protocol
  both implement and callers type against.
"""

from dify_serving.security.audit.chain import GENESIS, PURGE_ROUTE, ChainKey, Head
from dify_serving.security.audit.checkpoint import Checkpoint, CheckpointError, CheckpointPlaces
from dify_serving.security.audit.entry import (
    COLUMNS,
    FIELDS,
    MAX_SHORT_TEXT,
    AuditEntry,
    TextEntry,
)
from dify_serving.security.audit.log import MIN_RETENTION_DAYS, AuditLog, home_chain
from dify_serving.security.audit.query import MAX_QUERY_LIMIT, AuditFilter
from dify_serving.security.audit.seal import ERASED
from dify_serving.security.audit.ship import AuditShipper
from dify_serving.security.audit.trail import AuditTrail
from dify_serving.security.audit.verify import (
    ANCHOR_UNVOUCHED,
    CHAIN_BROKEN,
    CHECKPOINT_MISMATCH,
    CHECKPOINT_UNREADABLE,
    HASH_MISMATCH,
    OTHER_CHAIN,
    TAIL_MISSING,
    VerifyReport,
)
from dify_serving.security.audit.writer import AuditUnavailable

__all__ = [
    "ANCHOR_UNVOUCHED",
    "CHAIN_BROKEN",
    "CHECKPOINT_MISMATCH",
    "CHECKPOINT_UNREADABLE",
    "COLUMNS",
    "ERASED",
    "FIELDS",
    "GENESIS",
    "HASH_MISMATCH",
    "MAX_QUERY_LIMIT",
    "MAX_SHORT_TEXT",
    "MIN_RETENTION_DAYS",
    "OTHER_CHAIN",
    "PURGE_ROUTE",
    "TAIL_MISSING",
    "AuditEntry",
    "AuditFilter",
    "AuditLog",
    "AuditShipper",
    "AuditTrail",
    "AuditUnavailable",
    "ChainKey",
    "Checkpoint",
    "CheckpointError",
    "CheckpointPlaces",
    "Head",
    "TextEntry",
    "VerifyReport",
    "home_chain",
]
