"""Redis and PostgreSQL stopped under a running gateway, then started again.

Each test runs servers of its own on free ports (the shared 6379 and 5432 are never
touched) and an in-process gateway pointed at them. While a server is down, the routes
that need it answer a quick 503 with Retry-After and the JSON error shape (never a 500
or a hang), the routes that do not need it keep answering, and once the server is back
the same gateway serves again by itself: nobody restarts it.

Redis holds the rate limits, one-time codes, the shared result cache and (as a broker)
async tasks; PostgreSQL the keys and the audit log (the audit writer's queue across an
outage is `test_audit.py::test_entries_survive_an_outage`). A server that was never
reachable at all is covered in `tests/unit` (`test_redis_down_is_503_unless_fail_open`,
`test_an_unreachable_second_factor_store_is_a_fixed_503`, ...).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import redis
from fastapi.testclient import TestClient
from gateways import close_all, gateway, new_key, seed_support_and_other
from support import AUTH, free_port, require_service, wait_for

from dify_serving.gateway.app import create_app
from dify_serving.gateway.state import GatewayState
from dify_serving.options import GatewayOptions, SecurityOptions, TaskOptions
from dify_serving.security.secrets import Secrets
from dify_serving.tasks.cache import RedisCache

#: Seconds a refused request may take before the test calls it a hang (the stores' own
#: timeouts are far shorter; this only bounds a busy machine).
ANSWER_WITHIN_S = 10
#: Seconds a gateway gets to notice that its server is back.
RECOVER_WITHIN_S = 20


class RedisServer:
    """A private `redis-server` on a free port; stopped, paused and started again."""

    def __init__(self, directory: Path) -> None:
        require_service("redis-server", lambda: _which("redis-server"))
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
        )
        assert wait_for(self._answers, 10), "the private redis-server never answered"

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot stop
            self.proc.terminate()
            self.proc.wait(10)

    def pause(self) -> None:
        """Still listening, never answering: what a hung server looks like to a client."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class PostgresServer:
    """A private PostgreSQL cluster (trust auth) in a temporary folder, on a free port."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        pg_ctl = shutil.which("pg_ctl") or (bins[-1] if bins else None)
        require_service("PostgreSQL's pg_ctl", lambda: _which(pg_ctl or "pg_ctl"))
        self.bin = Path(os.path.realpath(pg_ctl or "")).parent
        # PostgreSQL refuses to run as root: then its files and server belong to `postgres`
        self.owner = "postgres" if os.geteuid() == 0 else None
        self.directory = Path(tempfile.mkdtemp(prefix="dm-outage-pg-"))
        if self.owner:
            shutil.chown(self.directory, self.owner)
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", "data", "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.owner:
            command = ["runuser", "-u", self.owner, "--", *command]
        subprocess.run(command, cwd=self.directory, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", "data", "-o", options, "-l", "log", "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", "data", "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self._run("pg_ctl", "-D", "data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


def _which(program: str) -> None:
    if shutil.which(program) is None:
        raise FileNotFoundError(f"{program} is not installed")


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    yield seed_support_and_other(tmp_path / "home")
    close_all()


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def answered(send: Callable[[], Any]) -> httpx.Response:
    """`send()`'s response, failing the test when none comes within ANSWER_WITHIN_S."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(send)
        try:
            response: httpx.Response = future.result(timeout=ANSWER_WITHIN_S)
            return response
        except concurrent.futures.TimeoutError:
            pytest.fail(f"no answer within {ANSWER_WITHIN_S} s: the gateway hangs")


def assert_unavailable(r: httpx.Response, code: str, *leaks: str) -> None:
    """A 503 a client can act on: Retry-After, the error shape, nothing internal."""
    assert r.status_code == 503, (r.status_code, r.text[:500])
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"] == {
        "code": code,
        "message": r.json()["error"]["message"],
        "request_id": r.headers["x-request-id"],
    }
    for leak in ("Traceback", "Error", "Connection", *leaks):
        assert leak not in r.text, r.text


# ---- Redis ---------------------------------------------------------------------------
@pytest.mark.parametrize("outage", ["stopped", "paused"])
def test_rate_limited_keys_get_503_while_redis_is_down_and_recover_by_themselves(
    home: Path, private_redis: RedisServer, outage: str
) -> None:
    client = gateway(home, redis_url=private_redis.url)
    limited = new_key(client, scopes=["inference"], rate_limit={"requests_per_minute": 1000})
    unlimited = new_key(client, scopes=["inference"])
    assert client.get("/v1/models", headers=limited["headers"]).status_code == 200

    private_redis.stop() if outage == "stopped" else private_redis.pause()
    r = answered(lambda: client.get("/v1/models", headers=limited["headers"]))
    assert_unavailable(r, "rate_limiter_unavailable", str(private_redis.port))
    # what needs no Redis keeps answering: a key without limits, a wrong key's 401
    assert answered(lambda: client.get("/v1/models", headers=unlimited["headers"])).is_success
    wrong = {"Authorization": "Bearer dm_nosuchkey000_" + "x" * 32}
    assert answered(lambda: client.get("/v1/models", headers=wrong)).status_code == 401

    private_redis.start() if outage == "stopped" else private_redis.resume()
    assert wait_for(
        lambda: client.get("/v1/models", headers=limited["headers"]).status_code == 200,
        RECOVER_WITHIN_S,
    )


def test_the_second_factor_gets_503_while_redis_is_down_and_recovers_by_itself(
    home: Path, private_redis: RedisServer
) -> None:
    client = gateway(home, redis_url=private_redis.url)
    created = client.app.state.guard.keys.create("ops", ["admin"], totp=True)  # type: ignore[attr-defined]
    totp = pyotp.TOTP(created.totp_secret)

    def unload() -> httpx.Response:
        headers = {"Authorization": f"Bearer {created.key}", "X-Dify-OTP": totp.now()}
        return client.post("/v1/models/unload", json={"name": "no-such-model"}, headers=headers)

    private_redis.stop()
    assert_unavailable(answered(unload), "second_factor_unavailable", str(private_redis.port))
    private_redis.start()
    # the code refused during the outage was never claimed: it is accepted now, once
    assert wait_for(lambda: unload().status_code == 404, RECOVER_WITHIN_S)


def test_async_tasks_get_503_while_the_redis_broker_is_down_and_recover_by_themselves(
    home: Path, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFY_MIRROR_BROKER_URL", private_redis.url)
    options = GatewayOptions(home=str(home), tasks=TaskOptions(broker="redis"))
    client = TestClient(create_app(GatewayState(options), Secrets(home)))
    body = {"model": "other-llm", "prompt": "x"}

    def submit() -> Any:
        return client.post("/v1/inference/async", json=body, headers=AUTH)

    assert submit().status_code == 202
    private_redis.stop()
    assert_unavailable(answered(submit), "broker_unavailable", str(private_redis.port))
    private_redis.start()
    assert wait_for(lambda: submit().status_code == 202, RECOVER_WITHIN_S)


def test_the_result_cache_misses_while_redis_is_down_and_is_used_again_after(
    private_redis: RedisServer,
) -> None:
    now = [0.0]  # the cache's clock: its pause after an error passes without sleeping
    cache = RedisCache(private_redis.url, 60, timeout_s=2.0, clock=lambda: now[0])

    async def put_then_get(key: str) -> bytes | None:
        await cache.put(key, b"answer")
        return await cache.get(key)

    assert asyncio.run(put_then_get("before")) == b"answer"
    private_redis.stop()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # misses, promptly
        assert pool.submit(asyncio.run, put_then_get("during")).result(ANSWER_WITHIN_S) is None
    private_redis.start()
    now[0] += 60
    assert wait_for(lambda: asyncio.run(put_then_get("after")) == b"answer", RECOVER_WITHIN_S)
    cache.close()


# ---- PostgreSQL ----------------------------------------------------------------------
def postgres_gateway(home: Path, url: str) -> TestClient:
    """A gateway with its keys and audit log in the PostgreSQL at `url`."""
    options = GatewayOptions(home=str(home), security=SecurityOptions(database=True))
    app = create_app(GatewayState(options), Secrets(home, database_url=url))
    return TestClient(app, client=("127.0.0.1", 40000), raise_server_exceptions=False)


def test_keys_in_postgresql_get_503_while_it_is_down_and_recover_by_themselves(
    home: Path, private_postgres: PostgresServer
) -> None:
    client = postgres_gateway(home, private_postgres.url)
    try:
        fresh = new_key(client, scopes=["inference"])  # not yet looked up: not cached
        private_postgres.stop()
        r = answered(lambda: client.get("/v1/models", headers=fresh["headers"]))
        assert_unavailable(r, "database_unavailable", str(private_postgres.port))
        r = answered(lambda: client.get("/v1/admin/keys", headers=AUTH))
        assert_unavailable(r, "database_unavailable", str(private_postgres.port))

        private_postgres.start()
        assert wait_for(
            lambda: client.get("/v1/models", headers=fresh["headers"]).status_code == 200,
            RECOVER_WITHIN_S,
        )
        assert client.get("/v1/admin/keys", headers=AUTH).status_code == 200
    finally:
        client.app.state.guard.close()  # type: ignore[attr-defined]


def test_task_rows_in_postgresql_get_503_while_it_is_down_and_recover_by_themselves(
    home: Path, private_postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFY_MIRROR_DATABASE_URL", private_postgres.url)
    options = GatewayOptions(
        home=str(home),
        security=SecurityOptions(enabled=False),  # the keys are the test above
        tasks=TaskOptions(database=True),
    )
    client = TestClient(create_app(GatewayState(options)), raise_server_exceptions=False)
    body = {"model": "other-llm", "prompt": "x"}
    submitted = client.post("/v1/inference/async", json=body)
    assert submitted.status_code == 202, submitted.text
    task = f"/v1/tasks/{submitted.json()['task_id']}"

    private_postgres.stop()
    for send in (lambda: client.get(task), lambda: client.post("/v1/inference/async", json=body)):
        assert_unavailable(answered(send), "database_unavailable", str(private_postgres.port))

    private_postgres.start()
    assert wait_for(lambda: client.get(task).status_code == 200, RECOVER_WITHIN_S)
    assert client.post("/v1/inference/async", json=body).status_code == 202
