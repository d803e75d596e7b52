"""The guard in-process: proxies, allowlists, route caps, TOTP policy, HTTPS, the CLI.

Shared Redis limits and PostgreSQL stores are `tests/services/test_security_gateway.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateways import app_noting_text, close_all, gateway, through_guard
from support import API_KEY, AUTH, free_port

from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    close_all()


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(home: Path) -> None:
    allow = {"ip_allowlist": ["198.51.100.0/24"], "trusted_proxies": ["10.0.0.0/8"]}
    via_proxy = gateway(home, "10.0.0.7", **allow)
    headers = {**AUTH, "X-Forwarded-For": "198.51.100.9, 10.0.0.8"}
    assert via_proxy.get("/v1/models", headers=headers).status_code == 200
    direct = gateway(home, "203.0.113.5", **allow)
    r = direct.get("/v1/models", headers=headers)  # a spoofed header changes nothing
    assert r.status_code == 403 and "203.0.113.5" in r.json()["error"]["message"]


def test_route_caps_apply_to_all_keys_together(home: Path) -> None:
    client = gateway(home, route_limits={"/v1/models": 3})
    statuses = [client.get("/v1/models", headers=AUTH).status_code for _ in range(5)]
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    assert client.get("/v1/models/status", headers=AUTH).status_code != 429


def test_admin_keys_without_a_second_factor_can_be_refused(home: Path) -> None:
    client = gateway(home, require_totp_for_admin=True)
    r = client.get("/v1/admin/keys", headers=AUTH)
    assert r.status_code == 403 and "second factor" in r.json()["error"]["message"]
    assert client.get("/v1/models", headers=AUTH).status_code == 200


@pytest.mark.parametrize("code", ["i8hC", "12345", "1234567", "12345a"])
def test_a_malformed_second_factor_is_refused_whatever_the_key(home: Path, code: str) -> None:
    """The code Schemathesis sent to a key without TOTP: ignored until now (found by
    tests/unit/test_fuzz.py); the document says six digits."""
    client = gateway(home)
    r = client.get("/v1/admin/keys", headers={**AUTH, "X-Dify-OTP": code})
    assert r.status_code == 422 and "X-Dify-OTP" in r.json()["error"]["message"]
    assert client.get("/v1/admin/keys", headers=AUTH).status_code == 200


@pytest.mark.parametrize(("fail_open", "status"), [(False, 503), (True, 200)])
def test_redis_down_is_503_unless_fail_open(home: Path, fail_open: bool, status: int) -> None:
    healthy = gateway(home)
    created = healthy.post(
        "/v1/admin/keys",
        json={"name": "r", "scopes": ["inference"], "rate_limit": {"requests_per_minute": 9}},
        headers=AUTH,
    ).json()
    client = gateway(home, redis_url="redis://127.0.0.1:1/0", fail_open=fail_open)
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {created['key']}"})
    assert r.status_code == status, r.text
    if status == 503:  # a fixed message: redis-py's text names the server's address
        assert r.json()["error"] == {
            "code": "rate_limiter_unavailable",
            "message": "rate limiting is unavailable; retry shortly",
            "request_id": r.headers["x-request-id"],
        }
        assert r.headers["Retry-After"] == "2"


def test_an_unreachable_second_factor_store_is_a_fixed_503(home: Path) -> None:
    import pyotp

    client = gateway(home, redis_url="redis://127.0.0.1:1/0")
    created = client.app.state.guard.keys.create("ops", ["admin"], totp=True)  # type: ignore[attr-defined]
    headers = {
        "Authorization": f"Bearer {created.key}",
        "X-Dify-OTP": pyotp.TOTP(created.totp_secret).now(),
    }
    r = client.post("/v1/models/unload", json={"name": "x"}, headers=headers)
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert r.json()["error"]["code"] == "second_factor_unavailable"
    assert r.json()["error"]["message"] == "the TOTP code cannot be checked now; retry shortly"
    for leak in ("127.0.0.1", "Connection", "Error"):
        assert leak not in r.text


def test_security_can_be_switched_off(home: Path) -> None:
    client = gateway(home, enabled=False)
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/admin/keys").status_code == 404


def test_bootstrap_key_file_is_private_when_generated(home: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("DIFY_MIRROR_BOOTSTRAP_KEY")
    gateway(home)
    path = home / "bootstrap.key"
    assert path.stat().st_mode & 0o777 == 0o600
    key = path.read_text().strip()
    client = gateway(home)  # a restart keeps the same first key, and makes no other
    assert (
        client.get("/v1/admin/keys", headers={"Authorization": f"Bearer {key}"}).json()["data"][0][
            "name"
        ]
        == "bootstrap"
    )


def test_the_gateway_serves_https_with_a_certificate(home: Path) -> None:
    import asyncio
    import datetime

    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from dify_serving.gateway.app import serve_directly

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = home / "tls.crt", home / "tls.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    options = GatewayOptions(home=str(home))
    app = create_app(GatewayState(options))
    port = free_port()

    async def scenario() -> tuple[int, int]:
        server = await serve_directly(app, "127.0.0.1", port, tls=(str(certfile), str(keyfile)))
        try:
            for _ in range(100):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(verify=str(certfile)) as http:
                secure = await http.get(f"https://localhost:{port}/v1/models", headers=AUTH)
                try:
                    await http.get(f"http://localhost:{port}/v1/models", headers=AUTH)
                    plain = 200
                except httpx.HTTPError:
                    plain = 0
            return secure.status_code, plain
        finally:
            server.should_exit = True
            await asyncio.sleep(0.3)
            app.state.guard.close()

    secure, plain = asyncio.run(scenario())
    assert secure == 200
    assert plain != 200  # plain HTTP on the TLS port gets nowhere


def test_cli_manages_keys_and_audits_itself(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFY_MIRROR_HOME": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dify_serving.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = cli("keys", "create", "--name", "ci", "--scopes", "inference", "--rpm", "60")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith(f"dm_{key['id']}_")
    bad = cli("keys", "create", "--name", "x", "--scopes", "inference", "--ip", "1.2.3/99")
    assert bad.returncode == 2 and "1.2.3/99" in bad.stderr
    listed = cli("keys", "list").stdout
    assert key["id"] in listed and key["key"].split("_", 2)[2] not in listed
    assert cli("keys", "revoke", key["id"]).returncode == 0
    assert cli("keys", "revoke", "nosuchkey000").returncode == 1
    assert "revoked" in cli("keys", "list").stdout
    verify = cli("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    from dify_serving.security.audit import AuditLog

    audit = AuditLog.from_settings_like(None, tmp_path)
    routes = [row["route"] for row in audit.query(limit=100)[0]]
    audit.close()
    assert routes.count("cli keys create") == 1 and routes.count("cli keys revoke") == 2


@pytest.mark.parametrize("record_text", [False, True])
def test_request_text_is_audited_only_when_asked(home: Path, record_text: bool) -> None:
    from dify_serving.gateway.security import Guard

    guard = Guard(SecurityOptions(record_text=record_text), home)
    try:
        auth = [(b"authorization", f"Bearer {API_KEY}".encode())]
        assert through_guard(guard, app_noting_text, "/v1/inference", auth) == 200
        guard.audit.flush()
        rows = guard.audit.query(route="/v1/inference")[0]
        detail = rows[-1]["detail"] or ""
        assert ("secret plans" in detail) is record_text
    finally:
        guard.close()
