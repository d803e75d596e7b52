"""A whole stack with a password in its database and Redis URLs: nobody else gets to see it.

`dify-mirror serve` runs in its own process (its own Ray), with the database URL from a
mounted-Secret style file and the Redis URL (an ACL user with a password) from the
environment. Once it answers, the password must not be in the Serve config the Ray
dashboard shows, in `desired-state.json`, on any process's command line, or in a log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import AUTH, free_port, require_service

PASSWORD = f"Pw{uuid.uuid4().hex}"
LIMIT = {"requests_per_minute": 5}


@pytest.fixture()
def redis_user() -> Iterator[str]:
    import redis

    require_service("Redis", lambda: redis.Redis(socket_timeout=2).ping())
    admin = redis.Redis()
    user = f"dmtest{uuid.uuid4().hex[:8]}"
    admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    try:
        yield f"redis://{user}:{PASSWORD}@127.0.0.1:6379/0"
    finally:
        admin.acl_deluser(user)
        admin.close()


@pytest.fixture()
def database() -> Iterator[str]:
    import psycopg

    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    require_service("PostgreSQL", lambda: psycopg.connect(url, connect_timeout=3).close())
    name = f"dm_secrets_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:  # trust authentication: the password is accepted and ignored, as a real one is used
        yield f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _command_lines() -> list[bytes]:
    lines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                lines.append((proc / "cmdline").read_bytes())
            except OSError:
                continue
    return lines


def _new_logs(since: float) -> list[Path]:
    found = []
    for root in (Path("/tmp/ray"),):
        for path in root.glob("session_*/logs/**/*"):
            try:
                if path.is_file() and path.stat().st_mtime >= since:
                    found.append(path)
            except OSError:
                continue
    return found


def test_secrets_stay_out_of_config_state_command_lines_and_logs(
    tmp_path: Path, redis_user: str, database: str
) -> None:
    started = time.time()
    secret_file = tmp_path / "database-url"
    secret_file.write_text(database)
    secret_file.chmod(0o600)
    manifest = tmp_path / "empty.yaml"
    manifest.write_text("")
    port, home = free_port(), tmp_path / "home"
    env = {
        **os.environ,
        "DIFY_MIRROR_HOME": str(home),
        "DIFY_MIRROR_RAY_DASHBOARD_PORT": str(free_port()),
        "DIFY_MIRROR_RAY_NUM_CPUS": "1",
        "DIFY_MIRROR_DATABASE_URL_FILE": str(secret_file),
        "DIFY_MIRROR_REDIS_URL": redis_user,
        "DIFY_MIRROR_KEY_PEPPER": f"pepper{PASSWORD}",
    }
    log = tmp_path / "serve.log"  # a file, not a pipe: nothing read until the end could fill
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dify_serving.cli",
                "serve",
                "-f",
                str(manifest),
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-5000:]
            try:
                created = httpx.post(
                    f"http://127.0.0.1:{port}/v1/admin/keys",
                    json={
                        "name": "limited",
                        "scopes": ["inference"],
                        "rate_limit": {"requests_per_minute": 5},
                    },
                    headers=AUTH,
                    timeout=10,
                )
                if created.status_code == 201:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve never answered"
            time.sleep(1)
        key = {"Authorization": f"Bearer {created.json()['key']}"}
        # the rate limit lives in Redis (as the ACL user), the key and audit in PostgreSQL
        statuses = [
            httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=key).status_code
            for _ in range(7)
        ]
        assert statuses.count(200) == 5 and statuses.count(429) == 2
        import psycopg

        with psycopg.connect(database.replace(f":{PASSWORD}", "")) as conn:
            assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 2

        config = httpx.get(
            f"http://127.0.0.1:{env['DIFY_MIRROR_RAY_DASHBOARD_PORT']}/api/serve/applications/",
            headers=_ray_headers(),
        ).text
        assert '"gateway"' in config and '"redis": true' in config.replace('":true', '": true')
        needle = PASSWORD.encode()
        assert needle not in config.encode()
        assert needle not in (home / "desired-state.json").read_bytes()
        assert not [line for line in _command_lines() if needle in line]
        leaked = [str(p) for p in _new_logs(started) if needle in p.read_bytes()]
        assert not leaked, leaked
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert PASSWORD not in log.read_text()


def _ray_headers() -> dict[str, str]:
    from dify_serving.control import ray_auth_token

    token = ray_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}
