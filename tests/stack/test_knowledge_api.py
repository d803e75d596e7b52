"""The data API end to end: upsert → search → delete → chat, on the real local stack."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from support import API_KEY, AUTH, index_doc

TOPICS = {
    "volcano": "Volcanoes erupt molten lava from the mantle. Magma chambers feed the eruptions, "
    "and ash clouds can ground aeroplanes for days.",
    "bread": "Sourdough bread rises slowly with wild yeast. Bakers feed the starter with flour "
    "and water and bake the loaf in a hot oven.",
    "chess": "In chess the knight moves in an L shape. Castling protects the king, and a pawn "
    "that reaches the last rank is promoted.",
}


def upsert(client: httpx.Client, index: str, docs: list[dict[str, Any]]) -> httpx.Response:
    return client.post("/v1/data/upsert", json={"index": index, "documents": docs})


def search(client: httpx.Client, index: str, **body: Any) -> httpx.Response:
    return client.post("/v1/data/search", json={"index": index, **body})


def long_text(sentences: int) -> str:
    return " ".join(
        f"Sentence number {i} talks about harbour cranes and container logistics."
        for i in range(sentences)
    )


@pytest.fixture(scope="module")
def corpus(client_module: httpx.Client) -> dict[str, Any]:
    docs = [
        {"id": k, "text": v, "metadata": {"lang": "en", "year": 2020 + i}}
        for i, (k, v) in enumerate(TOPICS.items())
    ]
    docs.append({"id": "harbour", "text": long_text(40), "metadata": {"lang": "de", "year": 2019}})
    r = upsert(client_module, "kb", docs)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def client_module(base_url: str) -> Any:
    with httpx.Client(base_url=base_url, timeout=120, headers=AUTH) as c:
        yield c


def test_upsert_reports_chunks_and_search_finds_the_topic(
    client: httpx.Client, corpus: dict[str, Any]
) -> None:
    counts = {d["id"]: d["chunks"] for d in corpus["documents"]}
    assert counts["volcano"] == 1 and counts["harbour"] > 5  # 64-token chunks
    r = search(client, "kb", query="lava and magma eruptions", top_k=3)
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["document_id"] == "volcano"
    assert hits[0]["metadata"] == {"lang": "en", "year": 2020}
    assert hits[0]["score"] > hits[-1]["score"]
    assert {"chunk_index", "text", "score", "start", "end"} <= set(hits[0])


def test_chunks_respect_the_token_limit_and_keep_offsets(
    client: httpx.Client, corpus: dict[str, Any]
) -> None:
    from tiny_models import minilm_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    r = search(client, "kb", query="harbour cranes", top_k=50, filter={"document_id": "harbour"})
    hits = r.json()["hits"]
    assert len(hits) == corpus["documents"][-1]["chunks"]
    source = long_text(40)
    for hit in hits:
        assert len(tok(hit["text"])["input_ids"]) <= 64
        assert source[hit["start"] : hit["end"]] == hit["text"]
    assert sorted(h["chunk_index"] for h in hits) == list(range(len(hits)))


def test_filters_match_any_of_and_range(client: httpx.Client, corpus: dict[str, Any]) -> None:
    def ids(flt: dict[str, Any]) -> set[str]:
        r = search(client, "kb", query="anything", top_k=100, filter=flt)
        assert r.status_code == 200, r.text
        return {h["document_id"] for h in r.json()["hits"]}

    assert ids({"lang": "de"}) == {"harbour"}
    assert ids({"year": {"gte": 2021}}) == {"bread", "chess"}
    assert ids({"document_id": ["bread", "chess"], "year": {"lt": 2022}}) == {"bread"}


def test_filter_on_unknown_field_is_422_naming_it(client: httpx.Client) -> None:
    r = search(client, "kb", query="x", filter={"colour": "red"})
    assert r.status_code == 422
    assert "colour" in r.json()["error"]["message"]


def test_reupsert_replaces_old_chunks(client: httpx.Client) -> None:
    assert upsert(client, "kb", [{"id": "temp", "text": long_text(30)}]).status_code == 200
    r = upsert(client, "kb", [{"id": "temp", "text": "Only one short sentence now."}])
    assert r.status_code == 200, r.text
    doc = r.json()["documents"][0]
    assert doc["chunks"] == 1 and doc["stale_chunks_removed"] > 1
    hits = search(client, "kb", query="x", top_k=100, filter={"document_id": "temp"}).json()
    assert [h["text"] for h in hits["hits"]] == ["Only one short sentence now."]


def test_failed_upsert_leaves_the_index_as_it_was(client: httpx.Client) -> None:
    before = search(client, "kb", query="x", top_k=100, filter={"document_id": "atomic"}).json()
    r = upsert(
        client,
        "kb",
        [
            {"id": "atomic", "text": "A perfectly good document."},
            {"id": "only-markup", "text": "<script>var x = 1;</script><style>p{}</style>"},
        ],
    )
    assert r.status_code == 422, r.text
    assert "only-markup" in r.json()["error"]["message"]
    after = search(client, "kb", query="x", top_k=100, filter={"document_id": "atomic"}).json()
    assert after["hits"] == before["hits"] == []


def test_html_is_cleaned_on_upsert(client: httpx.Client) -> None:
    html = "<html><head><style>.x{}</style></head><body><p>Caf&eacute; opens at nine.</p>"
    html += "<script>alert(1)</script><p>Closed on Sundays.</p></body></html>"
    assert upsert(client, "kb", [{"id": "cafe", "text": html}]).status_code == 200
    hit = search(client, "kb", query="cafe", top_k=1, filter={"document_id": "cafe"}).json()
    text = hit["hits"][0]["text"]
    assert "Café opens at nine." in text and "Closed on Sundays." in text
    assert "alert" not in text and "<p>" not in text


def test_delete_documents_returns_a_receipt(client: httpx.Client) -> None:
    assert upsert(client, "kb", [{"id": "gone", "text": long_text(12)}]).status_code == 200
    r = client.post("/v1/data/delete", json={"index": "kb", "document_ids": ["gone"]})
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert receipt["removed"][0]["index"] == "kb" and receipt["points_removed"] >= 2
    assert receipt["receipt_id"] and receipt["completed_at"]
    hits = search(client, "kb", query="x", top_k=10, filter={"document_id": "gone"}).json()
    assert hits["hits"] == []


def test_subject_erasure_spans_every_index(client: httpx.Client) -> None:
    doc = {"text": "Alice lives at 1 Main Street.", "subject_id": "alice"}
    assert upsert(client, "kb", [{"id": "a1", **doc}]).status_code == 200
    assert upsert(client, "notes", [{"id": "a2", **doc}, {"id": "b", "text": "Bob."}]).is_success
    r = client.post("/v1/data/delete", json={"subject_id": "alice"})
    assert r.status_code == 200, r.text
    removed = {x["index"]: x["points"] for x in r.json()["removed"]}
    assert removed["kb"] == 1 and removed["notes"] == 1
    for index in ("kb", "notes"):
        left = search(client, index, query="Alice", top_k=10, filter={"subject_id": "alice"})
        assert left.json()["hits"] == []
    assert search(client, "notes", query="Bob", top_k=1).json()["hits"][0]["document_id"] == "b"


def test_indexes_list_status_dimension_and_points(
    client: httpx.Client, corpus: dict[str, Any]
) -> None:
    r = client.get("/v1/indexes")
    assert r.status_code == 200, r.text
    by_name = {i["name"]: i for i in r.json()["data"]}
    assert by_name["kb"]["status"] == "Ready" and by_name["kb"]["dimension"] == 384
    assert by_name["kb"]["points"] >= sum(d["chunks"] for d in corpus["documents"])
    assert by_name["orphan"]["status"] == "Pending"
    assert "no-such-model" in by_name["orphan"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/data/search", {"index": "nope", "query": "x"}, 404, "nope"),
        ("/v1/data/upsert", {"index": "nope", "documents": [{"id": "a", "text": "b"}]}, 404, ""),
        ("/v1/data/embed", {"model": "nope", "input": "x"}, 404, "nope"),
        ("/v1/data/upsert", {"index": "kb", "documents": []}, 422, "documents"),
        ("/v1/data/upsert", {"index": "kb", "documents": [{"id": "a", "text": " "}]}, 422, ""),
        ("/v1/data/search", {"index": "kb", "query": "x", "top_k": 0}, 422, "top_k"),
        ("/v1/data/search", {"index": "kb", "query": "x", "top_k": 1001}, 422, "top_k"),
        ("/v1/data/search", {"index": "kb"}, 422, "query"),
        ("/v1/data/search", {"index": "kb", "vector": [0.1, 0.2]}, 422, "384"),
        ("/v1/data/delete", {"document_ids": ["a"]}, 422, "index"),
        ("/v1/chat", {"index": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, ""),
    ],
)
def test_bad_input_gets_a_clear_error(
    client: httpx.Client, path: str, body: dict[str, Any], status: int, needle: str
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["request_id"]


def test_oversized_document_is_413_naming_the_limit(client: httpx.Client) -> None:
    big = "word " * (2 * 1024 * 1024 + 1)  # just over 10 MB
    r = upsert(client, "kb", [{"id": "big", "text": big}])
    assert r.status_code == 413
    assert "10485760" in r.json()["error"]["message"]


def test_bytes_that_are_not_utf8_are_422(client: httpx.Client) -> None:
    body = b'{"index": "kb", "documents": [{"id": "x", "text": "caf\xe9"}]}'
    r = client.post("/v1/data/upsert", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "UTF-8" in r.json()["error"]["message"]


def test_embed_refuses_over_long_input_and_points_to_upsert(client: httpx.Client) -> None:
    r = client.post("/v1/data/embed", json={"model": "minilm", "input": "token " * 600})
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert "512" in message and "upsert" in message
    r = client.post(
        "/v1/data/embed", json={"model": "minilm", "input": ["token " * 600], "truncate": True}
    )
    assert r.status_code == 200 and r.json()["dimension"] == 384


def test_embed_picks_the_embedding_model_by_default(client: httpx.Client) -> None:
    r = client.post("/v1/data/embed", json={"input": ["hello", "world"]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "minilm" and len(r.json()["data"]) == 2


def test_clean_and_chunk_preview(client: httpx.Client) -> None:
    r = client.post(
        "/v1/data/clean",
        json={"text": "<p>Mail me: a@b.org</p>  <p>x\u0000y</p>", "rules": {"removeEmails": True}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "Mail me:\n\nxy"
    r = client.post("/v1/data/clean", json={"text": long_text(20), "index": "kb", "chunk": True})
    chunks = r.json()["chunks"]
    assert len(chunks) > 2 and all(c["tokens"] <= 64 for c in chunks)
    # the preview shows what an upsert would store: repeated chunks are dropped (with the
    # 8-token overlap, paragraphs 2-4 give the same chunk)
    repeated = "\n\n".join([long_text(3)] * 4)
    r = client.post("/v1/data/clean", json={"text": repeated, "index": "kb", "chunk": True})
    texts = [c["text"] for c in r.json()["chunks"]]
    assert r.json()["text"] == repeated and len(texts) == len(set(texts)) == 2


def test_knowledge_chat_cites_retrieved_chunks(
    client: httpx.Client, corpus: dict[str, Any]
) -> None:
    body = {
        "model": "demo-llm",
        "index": "kb",
        "messages": [{"role": "user", "content": "How does a knight move in chess?"}],
        "top_k": 2,
        "max_tokens": 8,
    }
    r = client.post("/v1/chat", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["citations"][0]["document_id"] == "chess"
    assert out["message"]["role"] == "assistant" and out["usage"]["completion_tokens"] > 0
    # the passages went into the prompt: it is longer than the question alone
    assert out["usage"]["prompt_tokens"] > 40

    with client.stream("POST", "/v1/chat", json={**body, "stream": True}) as s:
        events = [
            json.loads(line[6:])
            for line in s.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    assert events[0]["citations"][0]["document_id"] == "chess"
    assert events[-1]["finish_reason"] in ("length", "stop")


def test_openai_chat_accepts_an_index(base_url: str, corpus: dict[str, Any]) -> None:
    from openai import OpenAI

    api = OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY)
    result = api.chat.completions.create(
        model="demo-llm",
        messages=[{"role": "user", "content": "Tell me about sourdough bread"}],
        max_tokens=4,
        extra_body={"index": "kb", "top_k": 1},
    )
    citations = (result.model_extra or {})["citations"]
    assert citations[0]["document_id"] == "bread"


def _wait(predicate: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_index_survives_its_app_being_removed_and_restored(
    client: httpx.Client, stack: Any, corpus: dict[str, Any]
) -> None:
    before = search(client, "kb", query="lava", top_k=3).json()["hits"]
    state, _ = stack.store.load()
    kb = state.indexes.pop("kb")
    stack.apply(state)
    apps = stack.dashboard.get_applications
    _wait(lambda: "index-kb" not in apps()["applications"])
    state.indexes["kb"] = kb
    stack.apply(state)

    def answers() -> bool:
        r = search(client, "kb", query="lava", top_k=3)
        return r.status_code == 200

    _wait(answers)
    assert search(client, "kb", query="lava", top_k=3).json()["hits"] == before


def test_changing_to_a_model_of_another_dimension_is_409(
    client: httpx.Client, stack: Any, tiny_dir: Any
) -> None:
    from support import model_doc

    from dify_serving.manifests import DesiredState, parse_documents

    assert upsert(client, "notes", [{"id": "n", "text": "Some note."}]).status_code == 200
    state, _ = stack.store.load()
    original = DesiredState(dict(state.models), dict(state.indexes))
    extra = parse_documents(
        [
            model_doc("tiny-embed", str(tiny_dir / "clf"), "feature-extraction"),
            index_doc("notes", "tiny-embed"),
        ]
    )
    state.models.update(extra.models)
    state.indexes.update(extra.indexes)
    stack.apply(state)
    try:

        def mismatch() -> bool:  # settled: the new replica answers and the status says so
            listed = {i["name"]: i for i in client.get("/v1/indexes").json()["data"]}
            failed = listed["notes"]["status"] == "Failed"
            return failed and search(client, "notes", query="note").status_code == 409

        _wait(mismatch)
        r = search(client, "notes", query="note")
        message = r.json()["error"]["message"]
        assert "384" in message and "32" in message
        r = upsert(client, "notes", [{"id": "n2", "text": "Another note."}])
        assert r.status_code == 409
        listed = {i["name"]: i for i in client.get("/v1/indexes").json()["data"]}
        assert listed["notes"]["status"] == "Failed" and "384" in listed["notes"]["message"]
    finally:
        stack.apply(original)
    _wait(lambda: search(client, "notes", query="note").status_code == 200)
    stack.wait(300)


def test_documents_per_upsert_have_a_maximum(client: httpx.Client) -> None:
    """Over DIFY_MIRROR_MAX_DOCUMENTS an upsert becomes a bulk ingestion task (its
    documents all checked first: one empty text refuses the lot, nothing is stored);
    over 100,000 documents it is refused."""
    docs = [{"id": f"d{i}", "text": "t"} for i in range(1001)]
    docs[700]["text"] = " "
    r = upsert(client, "kb", docs)
    assert r.status_code == 422, r.text[:300]
    assert "documents.700.text" in r.json()["error"]["message"]
    r = upsert(client, "kb", [{"id": str(i), "text": "t"} for i in range(100_001)])
    assert r.status_code == 413, r.text[:300]
    assert "100000" in r.json()["error"]["message"]


def test_a_document_too_big_for_one_call_is_413_not_a_transport_error(
    client: httpx.Client,
) -> None:
    """5 MB: under the document limit, over what one call between deployments carries."""
    r = upsert(client, "kb", [{"id": "five", "text": "word " * (1024 * 1024)}])
    assert r.status_code == 413, r.text[:300]
    assert "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH" in r.json()["error"]["message"]
    assert "AioRpcError" not in r.text and "Traceback" not in r.text


def test_the_index_replica_keeps_searching_while_it_chunks_a_large_text(
    client: httpx.Client, base_url: str, corpus: dict[str, Any]
) -> None:
    """Cleaning and chunking run off the replica's event loop: searches keep answering.

    Searches are sent one after another for as long as the chunking request is in flight;
    were the chunking on the loop, one of them would wait for nearly all of it (1.5 s
    here), so the slowest must stay well under that (here: under 0.15 s)."""
    import threading

    block = "<div><p>Harbour cranes lift <b>containers</b> onto ships at night.</p></div>\n"
    html = block * (2 * 1024 * 1024 // len(block))  # 2 MB of HTML: seconds of work
    done = threading.Event()
    result: dict[str, Any] = {}

    def preview() -> None:
        started = time.monotonic()
        r = httpx.post(
            f"{base_url}/v1/data/clean",
            json={"text": html, "index": "kb", "chunk": True},
            headers=AUTH,
            timeout=300,
        )
        result["status"], result["seconds"] = r.status_code, time.monotonic() - started
        done.set()

    worker = threading.Thread(target=preview)
    worker.start()
    latencies = []
    while not done.is_set():
        started = time.monotonic()
        assert search(client, "kb", query="volcano", top_k=1).status_code == 200
        if not done.is_set():  # answered while the chunking was still in flight
            latencies.append(time.monotonic() - started)
    worker.join()
    assert result["status"] == 200
    worst = max(latencies, default=0.0)
    shown = [round(x * 1000) for x in sorted(latencies)[-5:]], round(result["seconds"], 1)
    assert len(latencies) >= 5, f"the chunking finished before it could be observed: {shown}"
    assert worst < result["seconds"] / 2, f"a search waited for the chunking: {shown}"


def test_an_answer_over_the_transport_limit_is_413_without_its_text(client: httpx.Client) -> None:
    """1000 hits with 8 KB of metadata each: gRPC refuses the reply; the client gets a 413."""
    blob = {"blob": "m" * 8000}
    ids = [f"fat-{i}" for i in range(1200)]
    try:
        for start in range(0, len(ids), 300):
            docs = [
                {"id": i, "text": f"filler record {i}", "metadata": blob}
                for i in ids[start : start + 300]
            ]
            assert upsert(client, "notes", docs).status_code == 200
        r = search(client, "notes", query="filler record", top_k=1000)
        assert r.status_code == 413, r.text[:300]
        message = r.json()["error"]["message"]
        assert "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH" in message and "top_k" in message
        assert "AioRpcError" not in r.text and "ipv4" not in r.text
    finally:
        r = client.post("/v1/data/delete", json={"index": "notes", "document_ids": ids})
        assert r.status_code == 200, r.text[:300]
