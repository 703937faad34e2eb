"""Structured logs: a request id per request, and the client id and unit on every line.

Over real HTTP: the id comes back in ``X-Request-ID``; the lines a sync makes,
on any of the server's threads, carry it with the client id and the unit; a
refused request makes one line; no principal is named unless asked for.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hospital.generate import generate
from hospital.units import schema

from syncunit.protocol import content_type
from syncunit.server import SyncServer
from syncunit.server.logs import JsonLogFormatter, LogFormatter
from syncunit.server.store import ServerStore
from tests.conftest import SIZE
from tests.support import LiveServer, sync_body
from tests.test_inspector import admin_or_staff


@pytest.fixture
def make_live(store: ServerStore, serve: Callable[[Any], LiveServer]) -> Callable[..., LiveServer]:
    generate(store.engine, **SIZE)

    def make(**options: Any) -> LiveServer:
        return serve(SyncServer(schema, store, authenticate=admin_or_staff(store), **options).app)

    return make


def post_sync(
    live: LiveServer, unit: str = "Login", *, token: str = "token-h1", **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{live.url}/v1/sync/{unit}",
        content=sync_body(client_id="device-42", chunk_size=16),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": content_type("msgpack"),
            **headers,
        },
        timeout=10,
    )


def server_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("syncunit.server")]


def wait_for(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the sync's line is written as its response ends
        for r in server_records(caplog):
            if text in r.getMessage():
                return r
        time.sleep(0.02)
    raise AssertionError(f"no log line with {text!r}")


def test_a_sync_logs_one_line_with_its_request_id_client_and_unit(make_live, caplog):
    caplog.set_level(logging.INFO, logger="syncunit")
    live = make_live()
    r = post_sync(live)
    assert r.status_code == 200
    rid = r.headers["X-Request-ID"]
    assert len(rid) >= 16
    line = wait_for(caplog, "sync Login: ok")
    assert (line.request_id, line.client_id, line.unit) == (rid, "device-42", "Login")
    assert line.rows_sent > 0
    assert line.bytes_out > 0
    assert line.threadName == "syncunit-frames"  # written on the response's worker thread
    assert f"request_id={rid} client_id=device-42 unit=Login" in LogFormatter().format(line)
    other = post_sync(live).headers["X-Request-ID"]
    assert other != rid


def test_a_callers_request_id_is_kept_when_it_looks_like_one(make_live):
    live = make_live()
    assert post_sync(live, **{"X-Request-ID": "edge-7f3a.1"}).headers["X-Request-ID"] == (
        "edge-7f3a.1"
    )
    odd = post_sync(live, **{"X-Request-ID": "a b\tc" + "x" * 100}).headers["X-Request-ID"]
    assert " " not in odd
    assert len(odd) < 64


def test_a_refused_request_logs_one_line_with_its_request_id(make_live, caplog):
    caplog.set_level(logging.INFO, logger="syncunit")
    live = make_live()
    caplog.clear()
    r = post_sync(live, "Nope")
    assert r.status_code == 404
    line = wait_for(caplog, "unknown-unit")
    assert server_records(caplog) == [line]
    assert line.request_id == r.headers["X-Request-ID"]


def test_no_principal_is_named_unless_asked(make_live, caplog):
    caplog.set_level(logging.INFO, logger="syncunit")
    quiet = make_live()
    # a staff principal is not an admin: the refusal's detail names it
    r = httpx.get(
        f"{quiet.url}/inspector/api/overview",
        headers={"Authorization": "Bearer token-h1"},
        timeout=10,
    )
    assert r.status_code == 403
    assert "staff:" in r.json()["detail"]  # the person asking is told...
    line = wait_for(caplog, "forbidden")
    assert "staff:" not in line.getMessage()  # ...the log is not
    assert not hasattr(line, "principal")

    caplog.clear()
    loud = make_live(log_principals=True)
    httpx.get(
        f"{loud.url}/inspector/api/overview",
        headers={"Authorization": "Bearer token-h1"},
        timeout=10,
    )
    line = wait_for(caplog, "forbidden")
    assert "staff:" in line.getMessage()
    assert line.principal.startswith("staff:")


def test_json_lines_carry_the_fields(make_live, caplog):
    caplog.set_level(logging.INFO, logger="syncunit")
    live = make_live()
    rid = post_sync(live, "Splash").headers["X-Request-ID"]
    line = json.loads(JsonLogFormatter().format(wait_for(caplog, "sync Splash")))
    assert line["request_id"] == rid
    assert line["client_id"] == "device-42"
    assert line["unit"] == "Splash"
    assert line["outcome"] == "ok"
    assert line["level"] == "INFO"
    assert "token" not in json.dumps(line)


def test_a_client_that_disconnects_mid_request_makes_one_plain_line(make_live, caplog):
    """An app that closes while it sends a push (a process ending) is no server error:
    one line without a traceback, and uvicorn sees the request end cleanly."""
    import socket

    caplog.set_level(logging.INFO, logger="syncunit")
    uvicorn_lines: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = uvicorn_lines.append  # type: ignore[method-assign]
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(handler)
    live = make_live()
    caplog.clear()
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/sync/SendAppointments HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer token-h1\r\n"
                + f"Content-Type: {content_type('msgpack')}\r\n".encode()
                + b"Content-Length: 100000\r\n\r\n"
                + b"\x00" * 10
            )  # and the rest never comes: the app is gone
        line = wait_for(caplog, "disconnected")
        time.sleep(0.3)  # a traceback, if any, would follow the line
    finally:
        uvicorn_log.removeHandler(handler)
    assert server_records(caplog) == [line]
    assert line.levelno == logging.INFO
    assert line.exc_info is None
    assert "POST /v1/sync/SendAppointments" in line.getMessage()
    assert line.request_id
    assert [r.getMessage() for r in uvicorn_lines if r.levelno >= logging.ERROR] == []


def _serve_log(serve_process: Any, database: str, tmp_path: Any, *options: str) -> list[str]:
    """Serve and make one request; the lines the process wrote to stdout and stderr."""
    url, _ = serve_process(database, 1, "--log-level", "info", *options)
    assert httpx.get(f"{url}/v1/catalog", timeout=10).status_code == 401
    log = tmp_path / f"serve-{url.rsplit(':', 1)[1]}.log"
    deadline = time.monotonic() + 10
    while "refused GET /v1/catalog" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the access line follows the response
    return [line for line in log.read_text().splitlines() if line.strip()]


def test_serve_json_logs_are_one_object_a_line_uvicorns_too(
    store, server_db_url, serve_process, tmp_path
):
    generate(store.engine, **SIZE)
    lines = _serve_log(serve_process, server_db_url, tmp_path, "--log-format", "json")
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    loggers = {r["logger"] for r in records}
    assert {"uvicorn.error", "uvicorn.access", "syncunit.server"} <= loggers, loggers
    assert any("Uvicorn running on" in r["message"] for r in records)
    assert any("GET /v1/catalog" in r["message"] and "401" in r["message"] for r in records)


def test_serve_without_the_access_log(store, server_db_url, serve_process, tmp_path):
    generate(store.engine, **SIZE)
    lines = _serve_log(
        serve_process, server_db_url, tmp_path, "--log-format", "json", "--no-access-log"
    )
    loggers = {json.loads(line)["logger"] for line in lines}
    assert "uvicorn.access" not in loggers
    assert "syncunit.server" in loggers  # the server's own lines stay
