"""Every SyncClient of a process shares one TLS context, made once, verifying as httpx does."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from syncunit.client import SyncClient
from syncunit.client import client as client_module


def test_clients_share_one_tls_context_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[ssl.SSLContext] = []
    make = httpx.create_ssl_context

    def counted() -> ssl.SSLContext:
        ctx = make()
        made.append(ctx)
        return ctx

    client_module.tls_context.cache_clear()
    monkeypatch.setattr(client_module.httpx, "create_ssl_context", counted)
    try:
        urls = ["http://127.0.0.1:9", "https://127.0.0.1:9", "http://localhost:9/prefix"]
        for i, url in enumerate(urls):
            SyncClient(url, tmp_path / f"device-{i}.sqlite").close()
    finally:
        client_module.tls_context.cache_clear()  # the next one is made unpatched
    assert len(made) == 1
    # httpx's default: certificates and host names checked.
    assert made[0].verify_mode == ssl.CERT_REQUIRED
    assert made[0].check_hostname
