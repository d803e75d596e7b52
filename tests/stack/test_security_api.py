"""Keys, scopes, second factor, rate limits and the audit trail, over real HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pyotp
import pytest
from support import API_KEY


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_key(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/admin/keys", json={"name": "t", **body})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Bearer dm_unknownkey01_T3stS3cretT3stS3cretT3stS3cretAB"},
        {"Authorization": "Bearer dm_testadmin001_WrongS3cretWrongS3cretWrongS3cret"},
    ],
)
def test_missing_or_bad_keys_are_401_with_one_message(base_url: str, headers: dict) -> None:
    r = httpx.get(f"{base_url}/v1/models", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["message"].startswith("missing or invalid API key")


def test_probes_and_docs_need_no_key(base_url: str) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert httpx.get(f"{base_url}{path}").status_code == 200, path


def test_scopes_are_enforced_403_naming_the_scope(client: httpx.Client, base_url: str) -> None:
    key = create_key(client, scopes=["inference"])["key"]
    assert httpx.get(f"{base_url}/v1/models", headers=bearer(key)).status_code == 200
    r = httpx.post(
        f"{base_url}/v1/data/search", json={"index": "kb", "query": "x"}, headers=bearer(key)
    )
    assert r.status_code == 403 and "data:read" in r.json()["error"]["message"]
    assert httpx.get(f"{base_url}/v1/admin/keys", headers=bearer(key)).status_code == 403


def test_keys_are_listed_without_secrets_and_revocation_is_immediate(
    client: httpx.Client, base_url: str
) -> None:
    created = create_key(client, scopes=["inference"], name="to-revoke")
    secret = created["key"].split("_", 2)[2]
    listing = client.get("/v1/admin/keys")
    assert listing.status_code == 200 and secret not in listing.text
    assert created["id"] in {k["id"] for k in listing.json()["data"]}
    assert client.delete(f"/v1/admin/keys/{created['id']}").status_code == 200
    r = httpx.get(f"{base_url}/v1/models", headers=bearer(created["key"]))
    assert r.status_code == 401
    assert client.delete("/v1/admin/keys/nosuchkey000").status_code == 404


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"scopes": ["inference"], "ip_allowlist": ["10.0.0.0/33"]}, "10.0.0.0/33"),
        ({"scopes": ["teleport"]}, "scopes"),
        ({"scopes": []}, "scopes"),
        ({"scopes": ["inference"], "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"scopes": ["inference"], "rate_limit": {"requests_per_minute": 0}}, "requests"),
    ],
)
def test_bad_key_bodies_are_422(client: httpx.Client, body: dict, needle: str) -> None:
    r = client.post("/v1/admin/keys", json={"name": "bad", **body})
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]


def test_expired_key_is_401(client: httpx.Client, base_url: str) -> None:
    expiry = int(time.time()) + 5  # whole seconds: valid for 4-5 s, room for a slow call
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry))
    key = create_key(client, scopes=["inference"], expires_at=soon)["key"]
    assert httpx.get(f"{base_url}/v1/models", headers=bearer(key)).status_code == 200
    time.sleep(max(0.0, expiry - time.time()) + 1.5)  # past it, and past the 1 s key cache
    assert httpx.get(f"{base_url}/v1/models", headers=bearer(key)).status_code == 401


def test_key_allowlist_ignores_a_spoofed_forwarded_for(client: httpx.Client, base_url: str) -> None:
    key = create_key(client, scopes=["inference"], ip_allowlist=["10.0.0.0/8", "2001:db8::/32"])
    spoof = {**bearer(key["key"]), "X-Forwarded-For": "10.1.2.3"}
    r = httpx.get(f"{base_url}/v1/models", headers=spoof)
    assert r.status_code == 403 and "127.0.0.1" in r.json()["error"]["message"]
    local = create_key(client, scopes=["inference"], ip_allowlist=["127.0.0.0/8"])
    assert httpx.get(f"{base_url}/v1/models", headers=bearer(local["key"])).status_code == 200


def test_second_factor_is_needed_once_per_code(client: httpx.Client, base_url: str) -> None:
    created = create_key(client, scopes=["models:admin"], totp=True)
    assert created["totp_uri"].startswith("otpauth://totp/")
    headers = bearer(created["key"])
    body = {"name": "no-such-model"}
    r = httpx.post(f"{base_url}/v1/models/unload", json=body, headers=headers)
    assert r.status_code == 401 and "X-Dify-OTP" in r.json()["error"]["message"]
    code = pyotp.TOTP(created["totp_secret"]).now()
    r = httpx.post(
        f"{base_url}/v1/models/unload", json=body, headers={**headers, "X-Dify-OTP": code}
    )
    assert r.status_code == 404  # admitted: the model does not exist
    r = httpx.post(
        f"{base_url}/v1/models/unload", json=body, headers={**headers, "X-Dify-OTP": code}
    )
    assert r.status_code == 401 and "used" in r.json()["error"]["message"]
    # a non-sensitive route needs no code
    assert httpx.get(f"{base_url}/v1/models", headers=headers).status_code == 403


def test_a_flood_from_one_key_gets_429_and_others_keep_working(
    client: httpx.Client, base_url: str
) -> None:
    limited = create_key(client, scopes=["inference"], rate_limit={"requests_per_minute": 20})
    other = create_key(client, scopes=["inference"])

    async def flood() -> tuple[list[int], list[int], httpx.Response]:
        statuses: list[int] = []
        others: list[int] = []
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as http:

            async def one(i: int) -> None:
                r = await http.get("/v1/models", headers=bearer(limited["key"]))
                statuses.append(r.status_code)
                if i % 1000 == 0:
                    o = await http.get("/v1/models", headers=bearer(other["key"]))
                    others.append(o.status_code)

            sem = asyncio.Semaphore(32)

            async def guarded(i: int) -> None:
                async with sem:
                    await one(i)

            await asyncio.gather(*(guarded(i) for i in range(10_000)))
            last = await http.get("/v1/models", headers=bearer(limited["key"]))
        return statuses, others, last

    started = time.monotonic()
    statuses, others, last = asyncio.run(flood())
    refilled = (time.monotonic() - started) / 3  # 20 per minute: one back every 3 s
    assert 20 <= statuses.count(200) <= 20 + refilled + 1
    assert statuses.count(429) == 10_000 - statuses.count(200)
    assert set(others) == {200}
    assert last.status_code == 429
    assert int(last.headers["retry-after"]) >= 1
    assert last.headers["x-ratelimit-limit"] == "20"
    assert last.headers["x-ratelimit-remaining"] == "0"


def test_every_request_is_audited_without_secrets(client: httpx.Client, base_url: str) -> None:
    marker = f"audit-{time.time_ns()}"
    key = create_key(client, scopes=["inference"], name=marker)
    httpx.get(f"{base_url}/v1/models", headers=bearer(key["key"]))
    httpx.get(f"{base_url}/v1/models", headers={"Authorization": "Bearer nonsense"})
    r = client.get("/v1/audit/logs", params={"key_id": key["id"]})
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert [(row["route"], row["status"]) for row in rows][-1] == ("/v1/models", 200)
    row = rows[-1]
    assert row["client_ip"] == "127.0.0.1" and row["latency_ms"] > 0 and row["bytes_out"] > 0
    refused = client.get("/v1/audit/logs", params={"status": 401, "route": "/v1/models"})
    assert refused.json()["data"], "refused requests are audited too"
    export = client.get("/v1/audit/export", params={"format": "jsonl"})
    assert export.status_code == 200
    assert key["key"].split("_", 2)[2] not in export.text
    assert API_KEY.split("_", 2)[2] not in export.text
    r = client.get("/v1/audit/logs", params={"route": "x' OR 1=1 --"})
    assert r.status_code == 200 and r.json()["data"] == []
    assert client.get("/v1/audit/logs", params={"cursor": "%%%"}).status_code == 422


def test_audit_pages_with_a_cursor(client: httpx.Client) -> None:
    first = client.get("/v1/audit/logs", params={"limit": 5})
    page = first.json()
    assert len(page["data"]) == 5 and page["next_cursor"]
    second = client.get("/v1/audit/logs", params={"limit": 5, "cursor": page["next_cursor"]})
    assert second.json()["data"][0]["seq"] == page["data"][-1]["seq"] + 1


def test_erasure_is_audited(client: httpx.Client) -> None:
    r = client.post("/v1/data/delete", json={"subject_id": "nobody-at-all"})
    assert r.status_code == 200, r.text
    receipt = r.json()["receipt_id"]
    rows = client.get("/v1/audit/logs", params={"route": "/v1/data/delete"}).json()["data"]
    assert any(receipt in (row.get("detail") or "") for row in rows)


def test_cli_verifies_the_chain(stack: Any) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFY_MIRROR_HOME": str(stack.settings.home)}
    out = subprocess.run(
        [sys.executable, "-m", "dify_serving.cli", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_keys_reach_only_what_their_scopes_and_patterns_allow(
    client: httpx.Client, base_url: str
) -> None:
    messages = [{"role": "user", "content": "what is in the knowledge base?"}]
    body = {"model": "demo-llm", "index": "kb", "messages": messages, "max_tokens": 4}
    inference_only = bearer(create_key(client, scopes=["inference"])["key"])
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=inference_only)
    assert r.status_code == 403 and "data:read" in r.json()["error"]["message"]
    listed = httpx.get(f"{base_url}/v1/models", headers=inference_only).json()["data"]
    sentiment = next(m for m in listed if m["id"] == "sentiment")
    assert sentiment["model_id"] is None  # a local path: admin keys only
    admin_view = client.get("/v1/models").json()["data"]
    assert next(m for m in admin_view if m["id"] == "sentiment")["model_id"].startswith("/")
    notes_only = create_key(client, scopes=["data:write", "data:read"], indexes=["notes"])
    r = httpx.post(
        f"{base_url}/v1/data/delete",
        json={"subject_id": "nobody-at-all"},
        headers=bearer(notes_only["key"]),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["removed"]] == ["notes"]  # kb is Ready too
    indexes = httpx.get(f"{base_url}/v1/indexes", headers=bearer(notes_only["key"]))
    assert [i["name"] for i in indexes.json()["data"]] == ["notes"]
    r = httpx.post(
        f"{base_url}/v1/data/search",
        json={"index": "kb", "query": "x"},
        headers=bearer(notes_only["key"]),
    )
    assert r.status_code == 403 and "'kb'" in r.json()["error"]["message"]
