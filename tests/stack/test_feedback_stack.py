"""Feedback over real HTTP against the real stack: a real inference request, rated at once
by its X-Request-ID (its audit row may still be on its way to the database), read back
by an admin, and seen in `/v1/metrics`."""

from __future__ import annotations

import time

import httpx


def series(text: str, name: str, *labels: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in labels)
    ]


def test_a_real_answer_is_rated_listed_and_counted(client: httpx.Client) -> None:
    r = client.post(
        "/v1/inference",
        json={"model": "demo-llm", "prompt": "rate me", "max_tokens": 4, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    started = time.perf_counter()
    rated = client.post(
        "/v1/models/feedback",
        json={"request_id": rid, "rating": "up", "comment": "quick", "subject_id": "stack-user"},
    )
    took_ms = (time.perf_counter() - started) * 1000
    assert rated.status_code == 201, rated.text
    body = rated.json()
    assert (body["request_id"], body["model"], body["rating"]) == (rid, "demo-llm", "up")
    print(f"\nrating right after the answer: {took_ms:.0f} ms")
    again = client.post("/v1/models/feedback", json={"request_id": rid, "rating": 4})
    assert again.status_code == 200 and again.json()["replaced"] is True

    listed = client.get("/v1/models/feedback", params={"model": "demo-llm"}).json()["data"]
    mine = [x for x in listed if x["request_id"] == rid]
    assert [(x["rating"], x["score"]) for x in mine] == [(4, 0.75)]

    deadline = time.monotonic() + 15  # the figures are cached for a few seconds
    while True:
        text = client.get("/v1/metrics").text
        if series(text, "dify_feedback_total", 'model="demo-llm"', 'rating="4"'):
            break
        assert time.monotonic() < deadline, "feedback never appeared in /v1/metrics"
        time.sleep(1)
    assert series(text, "dify_feedback_total", 'model="demo-llm"', 'rating="up"')
    (ratio,) = series(text, "dify_feedback_satisfaction_ratio", 'model="demo-llm"')
    assert 0.0 <= float(ratio.split()[-1]) <= 1.0

    unknown = client.post("/v1/models/feedback", json={"request_id": "nope", "rating": "up"})
    assert unknown.status_code == 404
