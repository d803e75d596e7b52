"""Settings are declared once; secrets are read where used and never passed on in clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dify_operator import reconcile
from dify_operator.settings import OperatorSettings
from dify_serving.catalog.files import LocalStateStore
from dify_serving.manifests import parse_documents
from dify_serving.options import GatewayOptions, SecurityOptions
from dify_serving.render import render_serve_config
from dify_serving.security import secrets as secrets_module
from dify_serving.security.secrets import SecretError, Secrets, key_pepper, read_secret
from dify_serving.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

PASSWORD = "Kn0wnPassw0rd-4-tests"
ENV = {
    "DIFY_MIRROR_DATABASE_URL": f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/test",
    "DIFY_MIRROR_REDIS_URL": f"redis://dmtest:{PASSWORD}@127.0.0.1:6379/0",
    "DIFY_MIRROR_KEY_PEPPER": f"pepper-{PASSWORD}",
    "DIFY_MIRROR_TRUSTED_PROXIES": "10.0.0.0/8",
    "DIFY_MIRROR_IP_ALLOWLIST": "10.0.0.0/8,192.0.2.0/24",
    "DIFY_MIRROR_ROUTE_LIMITS": "/v1/inference=50",
    "DIFY_MIRROR_REQUIRE_TOTP_FOR_ADMIN": "true",
    "DIFY_MIRROR_DEFAULT_MODEL": "demo-llm",
    "DIFY_MIRROR_GATEWAY_REPLICAS": "3",
    "DIFY_MIRROR_MAX_DOCUMENT_BYTES": "2048",
    "DIFY_MIRROR_MAX_BODY_BYTES": "1048576",
    "DIFY_MIRROR_MODEL_ROOTS": "/srv/models",
    "DIFY_MIRROR_HOME": "/srv/dify",
}
# where each listens: the host differs by design (a pod listens on every address)
CONTROL = {"control", "dashboard_url", "listen_host", "listen_port", "grpc_host"}


@pytest.fixture()
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def test_local_and_operator_paths_give_the_gateway_the_same_options(cluster_env: None) -> None:
    local = Settings().serve_options(proxy_port=9999, dashboard_url="http://127.0.0.1:8265")
    cluster = reconcile.serve_options(OperatorSettings())
    assert local.gateway.model_dump(exclude=CONTROL) == cluster.gateway.model_dump(exclude=CONTROL)
    security = cluster.gateway.security
    assert security.database and security.redis and security.require_totp_for_admin
    assert security.trusted_proxies == ["10.0.0.0/8"] and len(security.ip_allowlist) == 2
    assert cluster.gateway.default_model == "demo-llm" and cluster.gateway.replicas == 3
    assert cluster.gateway.limits.max_document_bytes == 2048
    assert cluster.gateway.sources.roots == ["/srv/models"]
    assert cluster.gateway.control == "kubernetes" and local.gateway.control == "local"


def test_secrets_stay_out_of_the_serve_config_and_the_state_file(
    cluster_env: None, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path)
    options = settings.serve_options(dashboard_url="http://127.0.0.1:8265")
    state = parse_documents([])
    config = json.dumps(render_serve_config(state, options))
    cluster = json.dumps(render_serve_config(state, reconcile.serve_options(OperatorSettings())))
    store = LocalStateStore(tmp_path)
    store.save(state, options)
    for text in (config, cluster, store.path.read_text(), repr(settings), str(settings)):
        assert PASSWORD not in text
    assert store.load()[1] == options  # and nothing was lost on the way


def test_the_operator_renders_shared_stores_without_holding_their_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(f"DIFY_MIRROR_{name}", raising=False)
        monkeypatch.delenv(f"DIFY_MIRROR_{name}_FILE", raising=False)
    monkeypatch.setenv("DIFY_MIRROR_DATABASE", "true")
    monkeypatch.setenv("DIFY_MIRROR_REDIS", "true")
    operator = OperatorSettings(home=tmp_path)
    assert operator.database_url is None and operator.redis_url is None
    security = reconcile.serve_options(operator).gateway.security
    assert security.database and security.redis


def test_secrets_the_cli_reads_are_checked_like_the_replicas_read_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DIFY_MIRROR_BOOTSTRAP_KEY", raising=False)
    secrets_module.write_secret(tmp_path, "bootstrap_key", "dm_not_a_key")
    with pytest.raises(ValidationError, match="must look like"):
        Settings(home=tmp_path)
    monkeypatch.setenv("DIFY_MIRROR_DATABASE_URL_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="names a file that does not exist"):
        Settings(home=tmp_path / "other")


def test_secrets_come_from_the_environment_a_file_or_the_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DIFY_MIRROR_REDIS_URL", "DIFY_MIRROR_REDIS_URL_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert read_secret("redis_url", tmp_path) is None
    secrets_module.write_secret(tmp_path, "redis_url", "redis://home")
    assert (tmp_path / "secrets" / "redis_url").stat().st_mode & 0o777 == 0o600
    assert read_secret("redis_url", tmp_path) == "redis://home"
    mounted = tmp_path / "mounted"
    mounted.write_text("redis://mounted\n")
    monkeypatch.setenv("DIFY_MIRROR_REDIS_URL_FILE", str(mounted))
    assert read_secret("redis_url", tmp_path) == "redis://mounted"
    assert Settings(home=tmp_path).secret("redis_url") == "redis://mounted"
    monkeypatch.setenv("DIFY_MIRROR_REDIS_URL", "redis://env")
    assert read_secret("redis_url", tmp_path) == "redis://env"
    monkeypatch.setenv("DIFY_MIRROR_REDIS_URL_FILE", str(tmp_path / "missing"))
    monkeypatch.delenv("DIFY_MIRROR_REDIS_URL")
    with pytest.raises(SecretError, match="does not exist"):
        read_secret("redis_url", tmp_path)


def test_a_replica_that_cannot_read_its_configured_secrets_refuses_to_start(
    tmp_path: Path,
) -> None:
    from dify_serving.gateway.security import Guard

    with pytest.raises(SecretError, match="DIFY_MIRROR_DATABASE_URL") as refused:
        Guard(SecurityOptions(database=True), tmp_path, Secrets(tmp_path))
    assert "sqlite" not in str(refused.value)
    assert not (tmp_path / "keys.db").exists()  # no silent fallback to a local file


def test_several_gateway_replicas_need_shared_limits() -> None:
    with pytest.raises(ValidationError, match="DIFY_MIRROR_REDIS_URL"):
        GatewayOptions(replicas=2)
    assert GatewayOptions(replicas=2, security=SecurityOptions(redis=True)).replicas == 2
    allowed = SecurityOptions(allow_per_replica_limits=True)
    assert GatewayOptions(replicas=2, security=allowed).replicas == 2
    assert GatewayOptions(replicas=2, security=SecurityOptions(enabled=False)).replicas == 2
    with pytest.raises(ValidationError, match="ALLOW_PER_REPLICA_LIMITS"):
        Settings(gateway_replicas=4).serve_options()


CLI = [sys.executable, "-m", "dify_serving.cli"]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "DIFY_MIRROR_BOOTSTRAP_KEY",
            "dm_short_x",
            "DIFY_MIRROR_BOOTSTRAP_KEY: must look like "
            "dm_<12 lowercase letters or digits>_<32+ characters>",
        ),
        ("DIFY_MIRROR_GATEWAY_REPLICAS", "2", "need DIFY_MIRROR_REDIS_URL"),
    ],
)
def test_a_bad_setting_stops_the_start_with_one_line(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    manifest = tmp_path / "empty.yaml"
    manifest.write_text("")
    env = {**os.environ, "DIFY_MIRROR_HOME": str(tmp_path / "home"), variable: value}
    out = subprocess.run(
        [*CLI, "serve", "-f", str(manifest)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert value not in out.stderr or variable != "DIFY_MIRROR_BOOTSTRAP_KEY"  # never echoed
    assert not (tmp_path / "home").exists()  # refused before anything started


def test_the_pepper_is_never_seen_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process creating the pepper is paused mid-way; another one reads it meanwhile."""
    monkeypatch.delenv("DIFY_MIRROR_KEY_PEPPER", raising=False)
    writing, resume = threading.Event(), threading.Event()
    real = secrets_module.secrets.token_urlsafe
    reader = threading.get_ident()

    def paused(n: int) -> str:
        if threading.get_ident() != reader:  # only the first, slow writer pauses
            writing.set()
            resume.wait(10)
        return real(n)

    monkeypatch.setattr(secrets_module.secrets, "token_urlsafe", paused)
    results: dict[str, bytes] = {}
    slow = threading.Thread(target=lambda: results.update(slow=key_pepper(tmp_path)))
    slow.start()
    assert writing.wait(10)
    results["fast"] = key_pepper(tmp_path)
    resume.set()
    slow.join(10)
    assert len(results["fast"]) >= 32 and results["fast"] == results["slow"]


def test_the_operators_default_gateway_url_is_the_charts_gateway_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Status endpoints name the gateway's Service (its HTTP port, not Serve's 8000)."""
    monkeypatch.delenv("DIFY_MIRROR_GATEWAY_URL", raising=False)
    values = yaml.safe_load((ROOT / "charts" / "dify-mirror" / "values.yaml").read_text())
    port = values["gateway"]["service"]["httpPort"]
    assert OperatorSettings().gateway_url == f"http://dify-mirror-gateway:{port}"
