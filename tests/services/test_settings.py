"""Settings against a real PostgreSQL: a plain `postgresql://` URL opens the key store.

The settings themselves, secrets included, are checked in `tests/unit/test_settings.py`.
"""

from __future__ import annotations

from pathlib import Path

from support import require_service

from dify_serving.security.keys import KeyStore


def test_one_engine_factory_takes_plain_postgresql_urls(tmp_path: Path) -> None:
    """`postgresql://` means psycopg 3 for keys as for audit (psycopg2 is not installed)."""
    import psycopg

    url = "postgresql://postgres@127.0.0.1:5432/test"
    require_service("PostgreSQL", lambda: psycopg.connect(url, connect_timeout=3).close())
    store = KeyStore("postgresql://postgres@127.0.0.1:5432/test", b"pepper")
    try:
        created = store.create("plain-url", ["inference"])
        assert store.authenticate(created.key).id == created.id
        assert store.revoke(created.id)
    finally:
        store.close()
