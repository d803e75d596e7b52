"""Erasing one data subject on the real stack: documents, searches, tasks, feedback, audit.

Two subjects each get a document in `kb` (upserted at once) and one in `notes` (a bulk
upsert task), an async generation and a rating of it, and searches answered the second
time from the index's cache. Then one of them is erased, once, for the whole module:
each test below looks at one place the erased subject must be gone from, and at the
other subject, who must be untouched. The session stack keeps no audit text
(`record_text` off), so the export holding neither subject's words is the baseline;
what it must hold is the erasure's own row, naming the receipt and the points removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from support import AUTH, wait_for

FINISHED = ("COMPLETED", "FAILED", "CANCELLED")
FRESH = {"Cache-Control": "no-cache"}


@dataclass
class Subject:
    """One data subject's documents, searches and the ids of what was made about them."""

    id: str
    words: tuple[str, ...]  # in every text about the subject, and in no other
    kb_doc: dict[str, Any]
    notes_doc: dict[str, Any]
    task_ids: list[str] = field(default_factory=list)  # the upsert task, the generation
    chunks: dict[str, int] = field(default_factory=dict)  # index → chunks stored

    @property
    def doc_ids(self) -> set[str]:
        return {self.kb_doc["id"], self.notes_doc["id"]}

    def queries(self) -> list[dict[str, Any]]:
        return [
            {"index": "kb", "query": self.kb_doc["text"], "top_k": 5},
            {"index": "notes", "query": self.notes_doc["text"], "top_k": 5},
        ]

    def shows_in(self, text: str) -> bool:
        return any(word.lower() in text.lower() for word in self.words)


def subject(tag: str, token: str, name: str, pet: str, place: str) -> Subject:
    sid = f"subj-{tag}-{token}"
    return Subject(
        id=sid,
        words=(name, pet, place),
        kb_doc={
            "id": f"erasure-{tag}-kb-{token}",
            "text": f"{name} keeps a {pet} in the old mill at {place}.",
            "subject_id": sid,
        },
        notes_doc={
            "id": f"erasure-{tag}-notes-{token}",
            "text": f"Notes on {name}: the {pet} was weighed again at {place} in spring.",
            "subject_id": sid,
        },
    )


@dataclass
class Erasure:
    """What the module's setup saw before the erasure, and the erasure's receipt."""

    gone: Subject
    kept: Subject
    started: float
    before: dict[str, list[httpx.Response]]  # subject id → its searches, cached
    receipt: dict[str, Any]


def search(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    r = client.post("/v1/data/search", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r


def wait_done(client: httpx.Client, task_id: str, timeout_s: float = 180) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def finished() -> bool:
        seen.update(client.get(f"/v1/tasks/{task_id}").json())
        if seen.get("status") in FINISHED:
            return True
        time.sleep(0.2)  # the task runs on the same few cores as this poll
        return False

    assert wait_for(finished, timeout_s), f"task {task_id} never finished: {seen}"
    assert seen["status"] == "COMPLETED", seen
    return seen


def prepare(client: httpx.Client, someone: Subject) -> None:
    """The subject's kb document (at once), notes document (a task), generation task and
    its rating; `someone` learns the ids and chunk counts."""
    r = client.post("/v1/data/upsert", json={"index": "kb", "documents": [someone.kb_doc]})
    assert r.status_code == 200, r.text
    someone.chunks["kb"] = r.json()["chunks"]
    body = {"index": "notes", "documents": [someone.notes_doc], "async": True}
    r = client.post("/v1/data/upsert", json=body)
    assert r.status_code == 202, r.text
    someone.task_ids.append(r.json()["task_id"])
    someone.chunks["notes"] = wait_done(client, someone.task_ids[-1])["output"]["chunks"]
    # sampled, so the answer is not kept in the gateway's result cache
    prompt = f"Write to {someone.words[0]} about the {someone.words[1]}"
    body = {"model": "demo-llm", "prompt": prompt, "max_tokens": 4, "temperature": 0.7}
    r = client.post("/v1/inference/async", json={**body, "subject_id": someone.id})
    assert r.status_code == 202, r.text
    someone.task_ids.append(r.json()["task_id"])
    wait_done(client, someone.task_ids[-1])
    rating = {"task_id": someone.task_ids[-1], "rating": 4, "subject_id": someone.id}
    r = client.post("/v1/models/feedback", json=rating)
    assert r.status_code == 201, r.text


def cached_searches(client: httpx.Client, someone: Subject) -> list[httpx.Response]:
    """Each of the subject's searches asked afresh, then answered from the cache."""
    answers = []
    for body in someone.queries():
        fresh, cached = search(client, body, **FRESH), search(client, body)
        assert (fresh.headers["x-cache"], cached.headers["x-cache"]) == ("MISS", "HIT")
        assert cached.json()["hits"][0]["subject_id"] == someone.id, cached.json()
        answers.append(cached)
    return answers


@pytest.fixture(scope="module")
def erasure(base_url: str) -> Iterator[Erasure]:
    token = uuid.uuid4().hex[:8]
    gone = subject("a", token, "Quillon Marwick", "axolotl", "Pelican Point")
    kept = subject("b", token, "Tamsin Oduya", "harpsichord", "Brackenfield")
    with httpx.Client(base_url=base_url, timeout=120, headers=AUTH) as client:
        started = time.time()
        try:
            for someone in (gone, kept):
                prepare(client, someone)
            before = {s.id: cached_searches(client, s) for s in (gone, kept)}
            assert search(client, gone.queries()[0]).headers["x-cache"] == "HIT"
            r = client.post("/v1/data/delete", json={"subject_id": gone.id})
            assert r.status_code == 200, r.text
            yield Erasure(gone, kept, started, before, r.json())
        finally:
            for someone in (gone, kept):  # again for the erased one: harmless
                client.post("/v1/data/delete", json={"subject_id": someone.id})


def ids(hits: httpx.Response | list[dict[str, Any]]) -> list[str]:
    found = hits.json()["hits"] if isinstance(hits, httpx.Response) else hits
    return [h["document_id"] for h in found]


def hits_about(r: httpx.Response, someone: Subject) -> list[dict[str, Any]]:
    return [
        h
        for h in r.json()["hits"]
        if h["document_id"] in someone.doc_ids
        or h["subject_id"] == someone.id
        or someone.shows_in(h["text"])
    ]


def test_the_receipt_counts_the_points_tasks_and_ratings_removed(erasure: Erasure) -> None:
    receipt, gone = erasure.receipt, erasure.gone
    assert receipt["receipt_id"] and receipt["subject_id"] == gone.id
    removed = {r["index"]: r["points"] for r in receipt["removed"]}
    assert removed["kb"] == gone.chunks["kb"] > 0
    assert removed["notes"] == gone.chunks["notes"] > 0
    assert receipt["points_removed"] == sum(removed.values()) == sum(gone.chunks.values())
    assert (receipt["tasks_removed"], receipt["feedback_removed"]) == (2, 1)


def test_searches_find_nothing_of_the_erased_subject_cached_or_fresh(
    client: httpx.Client, erasure: Erasure
) -> None:
    gone = erasure.gone
    for body, cached in zip(gone.queries(), erasure.before[gone.id], strict=True):
        assert hits_about(cached, gone), "the cached answer held the subject before"
        plain, again = search(client, body), search(client, body)
        fresh = search(client, body, **FRESH)
        only_theirs = search(client, {**body, "filter": {"subject_id": gone.id}}, **FRESH)
        for r in (plain, again, fresh, only_theirs):
            assert hits_about(r, gone) == [], r.json()
        assert plain.headers["x-cache"] == "MISS" and again.headers["x-cache"] == "HIT"
        assert only_theirs.json()["hits"] == []


def test_the_other_subject_is_still_found_and_cached(
    client: httpx.Client, erasure: Erasure
) -> None:
    kept = erasure.kept
    for body, cached in zip(kept.queries(), erasure.before[kept.id], strict=True):
        after = search(client, body)
        assert ids(after)[0] == ids(cached)[0] and ids(cached)[0] in kept.doc_ids
        assert ids(hits_about(after, kept)) == ids(hits_about(cached, kept))
        assert search(client, body).headers["x-cache"] == "HIT"


def test_the_erased_subject_tasks_are_gone_the_other_ones_remain(
    client: httpx.Client, erasure: Erasure
) -> None:
    for task_id in erasure.gone.task_ids:
        assert client.get(f"/v1/tasks/{task_id}").status_code == 404
    for task_id in erasure.kept.task_ids:
        r = client.get(f"/v1/tasks/{task_id}")
        assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text
    listed = client.get("/v1/tasks", params={"limit": 200}).json()["data"]
    ids = {t["task_id"] for t in listed}
    assert not ids & set(erasure.gone.task_ids)
    assert set(erasure.kept.task_ids) <= ids


def test_the_erased_subject_ratings_are_gone_the_other_ones_remain(
    client: httpx.Client, erasure: Erasure
) -> None:
    params = {"model": "demo-llm", "since": str(erasure.started - 1), "limit": "200"}
    listed = client.get("/v1/models/feedback", params=params).json()["data"]
    gone, kept = erasure.gone, erasure.kept
    assert [
        x for x in listed if x["subject_id"] == gone.id or x.get("task_id") in gone.task_ids
    ] == []
    mine = [
        (x["task_id"], x["subject_id"], x["rating"]) for x in listed if x["subject_id"] == kept.id
    ]
    assert mine == [(kept.task_ids[-1], kept.id, 4)]
    again = {"task_id": gone.task_ids[-1], "rating": 1, "subject_id": gone.id}
    assert client.post("/v1/models/feedback", json=again).status_code == 404


def test_the_audit_export_records_the_erasure_without_the_subject_text(
    client: httpx.Client, erasure: Erasure
) -> None:
    receipt = erasure.receipt["receipt_id"]

    def deletes() -> list[dict[str, Any]]:
        params = {"route": "/v1/data/delete", "since": str(erasure.started - 1)}
        return client.get("/v1/audit/logs", params=params).json()["data"]

    assert wait_for(lambda: any(receipt in (row.get("detail") or "") for row in deletes()), 30)
    export = client.get("/v1/audit/export", params={"since": str(erasure.started - 1)})
    assert export.status_code == 200, export.text
    rows = [json.loads(line) for line in export.text.splitlines()]
    (row,) = [r for r in rows if receipt in (r.get("detail") or "")]
    assert (row["route"], row["status"]) == ("/v1/data/delete", 200)
    # "erasure <receipt>: subject <id>; kb=1, notes=1; audit text keys destroyed=0"
    what, counts, _ = row["detail"].split("; ")
    assert what == f"erasure {receipt}: subject {erasure.gone.id}"
    removed = {r["index"]: r["points"] for r in erasure.receipt["removed"]}
    assert dict(c.split("=") for c in counts.split(", ")) == {k: str(v) for k, v in removed.items()}
    assert not erasure.gone.shows_in(export.text)


def test_the_audit_chain_still_verifies_after_the_erasure(stack: Any, erasure: Erasure) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dify_serving.cli", "audit", "verify", "--json"],
        env={**os.environ, "DIFY_MIRROR_HOME": str(stack.settings.home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["rows_checked"] > 0 and report["first_bad_seq"] is None
