"""Feedback rows: one rating per (rated request or task, key), and a tally per rating value.

SQLite under the state folder on one machine (`feedback.db`, WAL, beside `audit.db`),
PostgreSQL in a cluster (`DIFY_MIRROR_DATABASE_URL`), opened as the task rows are
(`security/db.py`). Two tables, because they answer two questions:

- `dify_feedback`: what each key thinks of each answer it got, now. A second rating of
  the same request (or task) by the same key replaces the first in place (one UPDATE,
  else one INSERT; a concurrent INSERT that wins the unique index makes this one an
  UPDATE), so the row keeps its `seq` (the listing's order and cursor) and `rated_at`
  moves. Subject erasure deletes rows; the satisfaction gauge is computed from here.
- `dify_feedback_tally`: how many ratings of each value each model/version has received,
  ever: the `dify_feedback_total` counter. It only grows (a replacement counts the new
  rating too, an erasure removes no count: a tally holds nothing about a person), so
  Prometheus' `rate()` never sees a reset that is not one, and it survives restarts of
  every gateway replica because it lives in the database, not in a process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from dify_serving.security.db import create_engine, database_url, sqlite_file

#: What a rating may be: 1..5 stars, or a thumb.
RATINGS = ("1", "2", "3", "4", "5", "up", "down")
Kind = Literal["request", "task"]
MAX_COMMENT_CHARS = 2000
#: Characters of a request id: what the request-id middleware keeps of `X-Request-ID`.
MAX_REQUEST_ID_CHARS = 128
MAX_SUBJECT_CHARS = 512
MAX_NAME_CHARS = 63
_VERSION_BLANK = ""  # stored for "no version" so the unique tally key has no NULL in it

metadata = sa.MetaData()
feedback = sa.Table(
    "dify_feedback",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("ref", sa.String(MAX_REQUEST_ID_CHARS), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("model", sa.String(MAX_NAME_CHARS), nullable=False),
    sa.Column("version", sa.String(MAX_NAME_CHARS), nullable=False),
    sa.Column("rating", sa.String(4), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("comment", sa.Text),
    sa.Column("subject_id", sa.String(MAX_SUBJECT_CHARS)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("rated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("kind", "ref", "key_id", name="dify_feedback_one_per_key"),
    sa.Index("dify_feedback_model", "model", "version", "seq"),
    sa.Index("dify_feedback_rated_at", "rated_at"),
    sa.Index("dify_feedback_subject", "subject_id"),
)
tally = sa.Table(
    "dify_feedback_tally",
    metadata,
    sa.Column("model", sa.String(MAX_NAME_CHARS), primary_key=True),
    sa.Column("version", sa.String(MAX_NAME_CHARS), primary_key=True),
    sa.Column("rating", sa.String(4), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


def score(rating: str) -> float:
    """Satisfaction in [0, 1]: up 1, down 0, r stars (r - 1) / 4."""
    if rating == "up":
        return 1.0
    if rating == "down":
        return 0.0
    return (int(rating) - 1) / 4


def split_model(served: str) -> tuple[str, str | None]:
    """`name@version` (what a versioned model answers as) → (name, version or None)."""
    name, at, version = served.partition("@")
    return name, (version or None) if at else None


@dataclass(slots=True)
class Feedback:
    """One stored rating, as the API shows it."""

    seq: int
    kind: str
    ref: str
    key_id: str
    model: str
    version: str | None
    rating: str
    score: float
    comment: str | None
    subject_id: str | None
    created_at: float
    rated_at: float

    @classmethod
    def of(cls, row: Any) -> Feedback:
        m = row._mapping
        return cls(
            seq=m["seq"],
            kind=m["kind"],
            ref=m["ref"],
            key_id=m["key_id"],
            model=m["model"],
            version=m["version"] or None,
            rating=m["rating"],
            score=m["score"],
            comment=m["comment"],
            subject_id=m["subject_id"],
            created_at=m["created_at"],
            rated_at=m["rated_at"],
        )


@dataclass(frozen=True, slots=True)
class Tally:
    """Per (model, version, rating): ratings received ever, and since when."""

    model: str
    version: str | None
    rating: str
    count: int
    created_at: float


@dataclass(frozen=True, slots=True)
class Satisfaction:
    """Per (model, version): the mean score of the ratings kept now, and how many."""

    model: str
    version: str | None
    ratings: int
    ratio: float


class FeedbackStore:
    """The feedback tables. Thread-safe (one engine, one connection per call); calls
    block, so async callers run them in a thread (`gateway/dataplane/feedback.py`)."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        self.engine = create_engine(url)
        self.clock = clock
        metadata.create_all(self.engine)

    @classmethod
    def open(cls, home: str | Path, configured: str | None) -> FeedbackStore:
        return cls(database_url(home, configured, "feedback"))

    def close(self) -> None:
        self.engine.dispose()

    def rate(
        self,
        *,
        kind: Kind,
        ref: str,
        key_id: str,
        model: str,
        version: str | None,
        rating: str,
        comment: str | None = None,
        subject_id: str | None = None,
    ) -> tuple[Feedback, bool]:
        """Store a rating; (the row, whether it replaced this key's earlier one)."""
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {', '.join(RATINGS)}, not {rating!r}")
        now = self.clock()
        values = {
            "model": model,
            "version": version or _VERSION_BLANK,
            "rating": rating,
            "score": score(rating),
            "comment": comment,
            "subject_id": subject_id,
            "rated_at": now,
        }
        mine = (feedback.c.kind == kind, feedback.c.ref == ref, feedback.c.key_id == key_id)
        for attempt in (1, 2):
            try:
                with self.engine.begin() as db:
                    replaced = bool(
                        db.execute(feedback.update().where(*mine).values(values)).rowcount
                    )
                    if not replaced:
                        db.execute(
                            feedback.insert().values(
                                kind=kind, ref=ref, key_id=key_id, created_at=now, **values
                            )
                        )
                    self._count(db, model, version, rating, now)
                    row = db.execute(sa.select(feedback).where(*mine)).one()
                return Feedback.of(row), replaced
            except sa.exc.IntegrityError:
                # another call inserted the same first rating meanwhile: update it instead
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _count(
        self, db: sa.Connection, model: str, version: str | None, rating: str, now: float
    ) -> None:
        key = (
            tally.c.model == model,
            tally.c.version == (version or _VERSION_BLANK),
            tally.c.rating == rating,
        )
        if not db.execute(tally.update().where(*key).values(count=tally.c.count + 1)).rowcount:
            db.execute(
                tally.insert().values(
                    model=model,
                    version=version or _VERSION_BLANK,
                    rating=rating,
                    count=1,
                    created_at=now,
                )
            )

    def page(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        rating: str | None = None,
        key_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[Feedback]:
        """Newest first (by first rating); `since` inclusive, `until` exclusive, on the
        time of the latest rating; `before` is the paging cursor (a `seq`)."""
        query = sa.select(feedback).order_by(feedback.c.seq.desc()).limit(limit)
        if model is not None:
            query = query.where(feedback.c.model == model)
        if version is not None:
            query = query.where(feedback.c.version == version)
        if rating is not None:
            query = query.where(feedback.c.rating == rating)
        if key_id is not None:
            query = query.where(feedback.c.key_id == key_id)
        if since is not None:
            query = query.where(feedback.c.rated_at >= since)
        if until is not None:
            query = query.where(feedback.c.rated_at < until)
        if before is not None:
            query = query.where(feedback.c.seq < before)
        with self.engine.connect() as db:
            return [Feedback.of(row) for row in db.execute(query)]

    def erase_subject(self, subject_id: str) -> int:
        """Remove every rating given about `subject_id` (GDPR erasure); the tallies stay."""
        with self.engine.begin() as db:
            return int(
                db.execute(feedback.delete().where(feedback.c.subject_id == subject_id)).rowcount
            )

    def tallies(self) -> list[Tally]:
        with self.engine.connect() as db:
            rows = db.execute(
                sa.select(
                    tally.c.model,
                    tally.c.version,
                    tally.c.rating,
                    tally.c.count,
                    tally.c.created_at,
                ).order_by(tally.c.model, tally.c.version, tally.c.rating)
            )
            return [
                Tally(str(m), str(v) or None, str(r), int(n), float(t)) for m, v, r, n, t in rows
            ]

    def satisfaction(self) -> list[Satisfaction]:
        query = (
            sa.select(
                feedback.c.model,
                feedback.c.version,
                sa.func.count(),
                sa.func.avg(feedback.c.score),
            )
            .group_by(feedback.c.model, feedback.c.version)
            .order_by(feedback.c.model, feedback.c.version)
        )
        with self.engine.connect() as db:
            return [
                Satisfaction(str(m), str(v) or None, int(n), float(mean))
                for m, v, n, mean in db.execute(query)
            ]


def sqlite_path(home: str | Path) -> Path:
    """Where one machine keeps its feedback: beside the audit trail's `audit.db`."""
    return sqlite_file(home, "feedback")
