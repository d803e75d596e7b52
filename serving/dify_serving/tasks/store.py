"""Task rows: what was asked, who asked, where it stands, and its result, in one table.

SQLite under the state folder on one machine (`tasks.db`, WAL), PostgreSQL in a cluster
(`DIFY_MIRROR_DATABASE_URL`), never a replica's memory. Every change of state is one
conditional UPDATE, which is what makes at-least-once delivery exactly once in effect:

- `claim` moves a task from PENDING to RUNNING and writes a fresh `runner` token; a
  copy of the message that arrives later (redelivery, a re-dispatch after a restart)
  finds the task RUNNING under a live lease, or finished, and does nothing.
- A runner keeps its lease alive (`heartbeat`); a task whose runner went silent for
  `lease_s` may be claimed again, at most `max_attempts` runs in all, then it FAILS with
  the reason.
- `finish` and `progress` write only while the row is still RUNNING under the caller's
  token: a runner that lost its lease, or whose task was cancelled, writes nothing, so
  no task is answered twice.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dify_serving.security.db import create_engine, database_url

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
)
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)
#: Owner of tasks submitted with security off.
NOBODY = "-"

metadata = sa.MetaData()
tasks = sa.Table(
    "dify_tasks",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("subject_id", sa.String(512)),
    # every subject a bulk upsert's documents name, as |a|b|: erasure finds the task
    sa.Column("subjects", sa.Text),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("model", sa.String(64)),
    sa.Column("queue", sa.String(128), nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("runner", sa.String(64)),
    sa.Column("partial", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("usage", sa.Text),
    sa.Column("progress", sa.Text),
    sa.Column("callback_url", sa.String(2048)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("dispatched_at", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Index("dify_tasks_queue_status", "queue", "status", "seq"),
    sa.Index("dify_tasks_owner", "owner", "seq"),
    sa.Index("dify_tasks_owner_status", "owner", "status"),
    sa.Index("dify_tasks_subject", "subject_id"),
    sa.Index("dify_tasks_status_heartbeat", "status", "heartbeat_at"),
)


def _ours(task_id: str, runner: str) -> tuple[Any, ...]:
    """The row of a task still running under `runner`'s claim."""
    return (tasks.c.id == task_id, tasks.c.runner == runner, tasks.c.status == RUNNING)


def new_task_id() -> str:
    return f"task-{secrets.token_hex(12)}"


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(slots=True)
class Task:
    """One row, as the API shows it (the request only to whoever runs it)."""

    id: str
    owner: str
    kind: str
    model: str | None
    queue: str
    status: str
    request: dict[str, Any]
    created_at: float
    seq: int = 0
    subject_id: str | None = None
    attempts: int = 0
    runner: str | None = None
    partial: str | None = None
    output: Any = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    callback_url: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, row: Any) -> Task:
        m = row._mapping
        return cls(
            seq=m["seq"],
            id=m["id"],
            owner=m["owner"],
            subject_id=m["subject_id"],
            kind=m["kind"],
            model=m["model"],
            queue=m["queue"],
            request=_load(m["request"]) or {},
            status=m["status"],
            attempts=m["attempts"],
            runner=m["runner"],
            partial=m["partial"],
            output=_load(m["output"]),
            error=_load(m["error"]),
            usage=_load(m["usage"]),
            progress=_load(m["progress"]),
            callback_url=m["callback_url"],
            created_at=m["created_at"],
            started_at=m["started_at"],
            finished_at=m["finished_at"],
            expires_at=m["expires_at"],
        )


class TaskStore:
    """The task table. Thread-safe (one engine, one connection per call); calls block,
    so async callers run them in a thread (`gateway/dataplane/tasks.py`)."""

    def __init__(self, url: str, ttl_s: float, clock: Any = time.time) -> None:
        self.engine = create_engine(url)
        self.ttl_s = ttl_s
        self.clock = clock
        metadata.create_all(self.engine)

    @classmethod
    def open(cls, home: str | Path, configured: str | None, ttl_s: float) -> TaskStore:
        return cls(database_url(home, configured, "tasks"), ttl_s)

    def close(self) -> None:
        self.engine.dispose()

    # the gateway's side --------------------------------------------------------------
    def create(
        self,
        *,
        owner: str,
        kind: str,
        queue: str,
        request: dict[str, Any],
        model: str | None = None,
        subject_id: str | None = None,
        subjects: list[str] | None = None,
        callback_url: str | None = None,
        progress: dict[str, Any] | None = None,
    ) -> Task:
        now = self.clock()
        task = Task(
            id=new_task_id(),
            owner=owner,
            kind=kind,
            model=model,
            queue=queue,
            status=PENDING,
            request=request,
            created_at=now,
            subject_id=subject_id,
            callback_url=callback_url,
            progress=progress,
        )
        with self.engine.begin() as db:
            result = db.execute(
                tasks.insert().values(
                    id=task.id,
                    owner=owner,
                    subject_id=subject_id,
                    subjects="|" + "|".join(subjects) + "|" if subjects else None,
                    kind=kind,
                    model=model,
                    queue=queue,
                    request=_json(request),
                    status=PENDING,
                    attempts=0,
                    callback_url=callback_url,
                    progress=_json(progress),
                    created_at=now,
                    dispatched_at=now,
                )
            )
            task.seq = int(result.inserted_primary_key[0])  # type: ignore[index]
        return task

    def discard(self, task_id: str) -> None:
        """Remove a task whose message never reached the broker (it was never accepted)."""
        with self.engine.begin() as db:
            db.execute(tasks.delete().where(tasks.c.id == task_id))

    def get(self, task_id: str) -> Task | None:
        """The task, or None when it does not exist or its result has expired."""
        with self.engine.connect() as db:
            row = db.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()
        if row is None:
            return None
        task = Task.of(row)
        if task.expires_at is not None and task.expires_at <= self.clock():
            return None
        return task

    def queue_position(self, task: Task) -> int:
        """Tasks ahead of a pending one in its queue (0: next)."""
        with self.engine.connect() as db:
            ahead = db.execute(
                sa.select(sa.func.count())
                .select_from(tasks)
                .where(
                    tasks.c.queue == task.queue,
                    tasks.c.status == PENDING,
                    tasks.c.seq < task.seq,
                )
            ).scalar_one()
        return int(ahead)

    def unfinished(self, owner: str) -> int:
        with self.engine.connect() as db:
            count = db.execute(
                sa.select(sa.func.count())
                .select_from(tasks)
                .where(tasks.c.owner == owner, tasks.c.status.in_((PENDING, RUNNING)))
            ).scalar_one()
        return int(count)

    def page(
        self,
        owner: str | None,
        status: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[Task]:
        """Newest first; `owner` None lists everyone's; `before` is the paging cursor."""
        query = sa.select(tasks).order_by(tasks.c.seq.desc()).limit(limit)
        if owner is not None:
            query = query.where(tasks.c.owner == owner)
        if status is not None:
            query = query.where(tasks.c.status == status)
        if before is not None:
            query = query.where(tasks.c.seq < before)
        now = self.clock()
        query = query.where(sa.or_(tasks.c.expires_at.is_(None), tasks.c.expires_at > now))
        with self.engine.connect() as db:
            return [Task.of(row) for row in db.execute(query)]

    def cancel(self, task_id: str) -> str | None:
        """CANCELLED if it was pending or running; else its (finished) status, or None."""
        now = self.clock()
        with self.engine.begin() as db:
            done = db.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status.in_((PENDING, RUNNING)))
                .values(
                    status=CANCELLED,
                    finished_at=now,
                    expires_at=now + self.ttl_s,
                    error=_json({"code": "cancelled", "message": "cancelled by the caller"}),
                )
            ).rowcount
            if done:
                return CANCELLED
            status = db.execute(sa.select(tasks.c.status).where(tasks.c.id == task_id)).scalar()
        return None if status is None else str(status)

    def erase_subject(self, subject_id: str) -> int:
        """Remove every task whose request carried `subject_id` (GDPR erasure): its own,
        or one of a bulk upsert's documents'. A running one's consumer stops it (its lease
        renewal finds the row gone)."""
        pattern = (
            "%|" + subject_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "|%"
        )
        with self.engine.begin() as db:
            return int(
                db.execute(
                    tasks.delete().where(
                        sa.or_(
                            tasks.c.subject_id == subject_id,
                            tasks.c.subjects.like(pattern, escape="\\"),
                        )
                    )
                ).rowcount
            )

    # the consumer's side -------------------------------------------------------------
    def claim(self, task_id: str, runner: str, lease_s: float, max_attempts: int) -> Task | None:
        """Take a task to run: the row, or None when it is not this runner's to run.

        A pending task, or a running one whose runner has been silent for `lease_s`, is
        claimed; one already run `max_attempts` times fails instead.
        """
        now = self.clock()
        claimable = sa.or_(
            tasks.c.status == PENDING,
            sa.and_(tasks.c.status == RUNNING, tasks.c.heartbeat_at < now - lease_s),
        )
        with self.engine.begin() as db:
            claimed = db.execute(
                tasks.update()
                .where(tasks.c.id == task_id, claimable, tasks.c.attempts < max_attempts)
                .values(
                    status=RUNNING,
                    runner=runner,
                    attempts=tasks.c.attempts + 1,
                    started_at=now,
                    heartbeat_at=now,
                    partial=None,
                )
            ).rowcount
            if not claimed:
                db.execute(
                    tasks.update()
                    .where(tasks.c.id == task_id, claimable, tasks.c.attempts >= max_attempts)
                    .values(
                        status=FAILED,
                        finished_at=now,
                        expires_at=now + self.ttl_s,
                        error=_json(
                            {
                                "code": "interrupted",
                                "message": f"the task was interrupted {max_attempts} times "
                                "(its consumer stopped while running it); not retried again",
                            }
                        ),
                    )
                )
                return None
            row = db.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()
        return None if row is None else Task.of(row)

    def heartbeat(self, claims: dict[str, str]) -> set[str]:
        """Renew the leases of running tasks (`claims`: task id → runner token); the ids
        no longer running under that token (cancelled, or taken over) are returned, so
        their work can stop. Runner tokens are random and used once, so matching ids and
        tokens as two sets matches the pairs."""
        if not claims:
            return set()
        ids, runners = list(claims), list(claims.values())
        ours = (tasks.c.id.in_(ids), tasks.c.runner.in_(runners), tasks.c.status == RUNNING)
        with self.engine.begin() as db:
            db.execute(tasks.update().where(*ours).values(heartbeat_at=self.clock()))
            live = set(db.execute(sa.select(tasks.c.id).where(*ours)).scalars())
        return set(ids) - live

    def progress(
        self,
        task_id: str,
        runner: str,
        *,
        partial: str | None = None,
        progress: dict[str, Any] | None = None,
    ) -> bool:
        """Partial output or progress of a running task; False when it is no longer ours."""
        values: dict[str, Any] = {"heartbeat_at": self.clock()}
        if partial is not None:
            values["partial"] = partial
        if progress is not None:
            values["progress"] = _json(progress)
        with self.engine.begin() as db:
            return bool(
                db.execute(tasks.update().where(*_ours(task_id, runner)).values(**values)).rowcount
            )

    def finish(
        self,
        task_id: str,
        runner: str,
        *,
        output: Any = None,
        error: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
        progress: dict[str, Any] | None = None,
        partial: str | None = None,
        request: dict[str, Any] | None = None,
    ) -> bool:
        """COMPLETED (or FAILED with `error`), once: False when the task is no longer
        this runner's (cancelled, or taken over after its lease ran out)."""
        now = self.clock()
        values: dict[str, Any] = {
            "status": FAILED if error is not None else COMPLETED,
            "output": _json(output),
            "error": _json(error),
            "usage": _json(usage),
            "finished_at": now,
            "expires_at": now + self.ttl_s,
            "progress": _json(progress),  # the final one, or none (a wait note goes)
        }
        if partial is not None:
            values["partial"] = partial
        if request is not None:  # what is kept of the request once it has run
            values["request"] = _json(request)
        with self.engine.begin() as db:
            return bool(
                db.execute(tasks.update().where(*_ours(task_id, runner)).values(**values)).rowcount
            )

    def stale(self, lease_s: float, limit: int = 1000) -> list[str]:
        """Running tasks whose runner has been silent for `lease_s` (it died)."""
        now = self.clock()
        with self.engine.connect() as db:
            return list(
                db.execute(
                    sa.select(tasks.c.id)
                    .where(tasks.c.status == RUNNING, tasks.c.heartbeat_at < now - lease_s)
                    .limit(limit)
                ).scalars()
            )

    def redispatch(self, task_ids: Iterable[str], not_since: float) -> list[tuple[str, str]]:
        """Mark these tasks dispatched now unless another sweeper did after `not_since`:
        (id, queue) of the ones this caller should send again."""
        ids = list(task_ids)
        out = []
        now = self.clock()
        with self.engine.begin() as db:
            for task_id in ids:
                taken = db.execute(
                    tasks.update()
                    .where(
                        tasks.c.id == task_id,
                        tasks.c.status.in_((PENDING, RUNNING)),
                        sa.or_(tasks.c.dispatched_at.is_(None), tasks.c.dispatched_at < not_since),
                    )
                    .values(dispatched_at=now)
                ).rowcount
                if taken:
                    queue = db.execute(
                        sa.select(tasks.c.queue).where(tasks.c.id == task_id)
                    ).scalar_one()
                    out.append((task_id, str(queue)))
        return out

    def undispatch(self, task_id: str) -> None:
        """A send that failed: the task may be taken by the next sweep again."""
        with self.engine.begin() as db:
            db.execute(tasks.update().where(tasks.c.id == task_id).values(dispatched_at=None))

    def counts(self) -> dict[tuple[str, str], int]:
        """Tasks kept, by (queue, status): what the metrics show."""
        query = sa.select(tasks.c.queue, tasks.c.status, sa.func.count()).group_by(
            tasks.c.queue, tasks.c.status
        )
        with self.engine.connect() as db:
            return {(str(q), str(st)): int(n) for q, st, n in db.execute(query)}

    def pending(self, queues: Iterable[str], limit: int = 100_000) -> list[str]:
        with self.engine.connect() as db:
            return list(
                db.execute(
                    sa.select(tasks.c.id)
                    .where(tasks.c.status == PENDING, tasks.c.queue.in_(list(queues)))
                    .order_by(tasks.c.seq)
                    .limit(limit)
                ).scalars()
            )

    def expire(self) -> int:
        """Remove finished tasks whose result has expired."""
        with self.engine.begin() as db:
            return int(
                db.execute(
                    tasks.delete().where(
                        tasks.c.expires_at.is_not(None), tasks.c.expires_at <= self.clock()
                    )
                ).rowcount
            )
