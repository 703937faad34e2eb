"""Prometheus metrics: who may read them, and that they count what happened.

Over real HTTP against the hospital server: syncs by unit and outcome, rows and
bytes both ways, push results by kind, durations, refusals, long-polls waiting,
the watermark and the tombstones; one registry per server.
"""

from __future__ import annotations

import gzip
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hospital.generate import generate
from hospital.units import schema
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from syncunit.client import SyncClient
from syncunit.errors import ProblemError
from syncunit.protocol import content_type
from syncunit.server import SyncServer
from syncunit.server.store import ServerStore
from tests.conftest import SIZE, PlainSQL
from tests.support import LiveServer, chunks, final_cursors, raw_sync, sync_body
from tests.test_inspector import ADMIN, admin_or_staff

TOKEN = "scrape-secret"


@pytest.fixture
def ops(store: ServerStore, serve: Callable[[Any], LiveServer]) -> tuple[SyncServer, LiveServer]:
    srv = SyncServer(schema, store, authenticate=admin_or_staff(store), metrics_token=TOKEN)
    generate(store.engine, **SIZE)
    return srv, serve(srv.app)


def scrape(live: LiveServer, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{live.url}/metrics", headers=headers, timeout=10)


def samples(live: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = scrape(live)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict[Any, float], name: str, **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_token_or_an_admin(ops):
    _, live = ops
    assert scrape(live, None).status_code == 401
    assert scrape(live, "wrong").status_code == 401
    staff = scrape(live, "token-h1")
    assert staff.status_code == 403
    assert staff.json()["code"] == "forbidden"
    assert scrape(live, TOKEN).status_code == 200
    assert scrape(live, ADMIN).status_code == 200


def test_syncs_rows_bytes_and_durations_are_counted_by_unit(ops):
    _, live = ops
    first = raw_sync(live.url, "Login", token="token-h1", chunk_size=16)
    rows = sum(c.row_count() for c in chunks(first))
    assert rows == SIZE["doctors"] + SIZE["appointments"] // SIZE["hospitals"]
    again = raw_sync(live.url, "Login", token="token-h1", cursors=final_cursors(first))
    assert chunks(again) == [] or all(not c.row_count() for c in chunks(again))
    data = samples(live)
    login = value(data, "syncunit_syncs_total", unit="Login", outcome="ok")
    assert login >= 2  # each run is one response or more
    assert value(data, "syncunit_syncs_total", unit="Splash", outcome="ok") == 0
    assert value(data, "syncunit_rows_sent_total", unit="Login", kind="upsert") == rows
    assert value(data, "syncunit_request_bytes_total", unit="Login") > 0
    out = value(data, "syncunit_response_bytes_total", unit="Login")
    assert out > rows * 10  # every row went out, as bytes
    assert value(data, "syncunit_sync_duration_seconds_count", unit="Login") == login
    assert value(data, "syncunit_sync_duration_seconds_sum", unit="Login") > 0


def test_push_results_are_counted_by_kind(ops, tmp_path):
    _, live = ops
    with SyncClient(live.url, tmp_path / "d.sqlite", token="token-h1", chunk_size=500) as c:
        c.sync("Login")
        first, second = c.store.conn.execute(
            "SELECT id, starts_at FROM LocalAppointment ORDER BY id LIMIT 2"
        ).fetchall()
        c.update("LocalAppointment", first[0], {"notes": "seen"})
        # the hospital's rule: an appointment must end after it starts
        c.update("LocalAppointment", second[0], {"ends_at": second[1]})
        c.sync("SendAppointments")
    data = samples(live)
    unit = "SendAppointments"
    assert value(data, "syncunit_mutations_received_total", unit=unit) == 2
    assert value(data, "syncunit_push_duration_seconds_count", unit=unit) == 1
    applied = value(data, "syncunit_push_results_total", unit=unit, status="applied")
    rejected = value(data, "syncunit_push_results_total", unit=unit, status="rejected")
    assert (applied, rejected) == (1, 1)


def test_refusals_are_counted_by_code(ops):
    _, live = ops
    httpx.post(f"{live.url}/v1/sync/Login", content=b"{}", timeout=10)  # no token
    httpx.post(f"{live.url}/v1/sync/Nope", headers={"Authorization": "Bearer token-h1"}, timeout=10)
    data = samples(live)
    assert value(data, "syncunit_refused_requests_total", code="unauthenticated") == 1
    assert value(data, "syncunit_refused_requests_total", code="unknown-unit") == 1


def test_a_long_poll_waiting_is_seen(ops):
    srv, live = ops
    cursors = final_cursors(raw_sync(live.url, "Login", token="token-h1"))
    body = sync_body(cursors=cursors, encoding="json")
    answered: list[int] = []

    def poll() -> None:
        r = httpx.post(
            f"{live.url}/v1/live/Login?wait=10",
            content=body,
            headers={"Authorization": "Bearer token-h1", "Content-Type": "application/json"},
            timeout=20,
        )
        answered.append(r.status_code)

    t = threading.Thread(target=poll)
    t.start()
    deadline = time.monotonic() + 10
    seen = 0.0
    while time.monotonic() < deadline and not seen:
        seen = value(samples(live), "syncunit_live_waiters")
        time.sleep(0.05)
    assert seen == 1
    plain = srv.store.engine
    with plain.begin() as conn:  # a change in scope answers the poll
        conn.exec_driver_sql("UPDATE doctor SET name = name || ' Jr' WHERE hospital_id = 1")
    t.join(15)
    assert answered == [200]
    assert value(samples(live), "syncunit_live_waiters") == 0


def test_watermark_and_tombstones_are_read_when_scraped(ops, plain_sql: PlainSQL):
    srv, live = ops
    before = samples(live)
    assert value(before, "syncunit_database_up") == 1
    assert value(before, "syncunit_watermark") == srv.store.current_version()
    assert value(before, "syncunit_watermark_lag_seconds") == 0
    tombs = value(before, "syncunit_tombstones")
    plain_sql("DELETE FROM appointment WHERE id IN (SELECT id FROM appointment LIMIT 3)")
    after = samples(live)
    assert value(after, "syncunit_tombstones") == tombs + 3
    assert value(after, "syncunit_watermark") > value(before, "syncunit_watermark")
    horizon = srv.store.prune_tombstones(keep_versions=0)
    pruned = samples(live)
    assert value(pruned, "syncunit_tombstones") == 0
    assert value(pruned, "syncunit_tombstone_horizon") == horizon > 0


def test_a_database_outage_is_logged_once_in_a_line_not_at_every_scrape(
    ops, plain_sql: PlainSQL, caplog: pytest.LogCaptureFixture
):
    """Scraped during a restore (syncunit's tables gone for a while), the database is
    down: one line with the database's own words when it begins, no traceback, and
    one when it is back; each scrape still says ``syncunit_database_up 0``."""
    _, live = ops
    caplog.set_level(logging.INFO, logger="syncunit")
    plain_sql("ALTER TABLE syncunit_tombstones RENAME TO syncunit_tombstones_restoring")
    try:
        for _ in range(3):
            assert value(samples(live), "syncunit_database_up") == 0
    finally:
        plain_sql("ALTER TABLE syncunit_tombstones_restoring RENAME TO syncunit_tombstones")
    assert value(samples(live), "syncunit_database_up") == 1
    assert value(samples(live), "syncunit_database_up") == 1
    lines = [r for r in caplog.records if r.getMessage().startswith("metrics:")]
    assert [r.exc_info for r in lines] == [None, None], [r.getMessage() for r in lines]
    failed, back = (r.getMessage() for r in lines)
    assert failed.startswith("metrics: reading the database failed: ")
    assert "syncunit_tombstones" in failed
    assert "\n" not in failed
    assert back == "metrics: reading the database works again"


def test_each_server_counts_its_own(store: ServerStore, serve, tmp_path):
    auth = admin_or_staff(store)
    generate(store.engine, **SIZE)
    one = SyncServer(schema, store, authenticate=auth, metrics_token=TOKEN)
    two = SyncServer(schema, store, authenticate=auth, metrics_token=TOKEN)
    live_one, live_two = serve(one.app), serve(two.app)
    with SyncClient(live_one.url, tmp_path / "d.sqlite", token="token-h1") as c:
        c.sync("Splash")
    assert value(samples(live_one), "syncunit_syncs_total", unit="Splash", outcome="ok") == 1
    assert value(samples(live_two), "syncunit_syncs_total", unit="Splash", outcome="ok") == 0


def test_a_server_failure_is_counted_as_internal(ops, monkeypatch):
    srv, live = ops

    def broken() -> None:
        raise RuntimeError("a bug in the server")

    monkeypatch.setattr(srv, "_maybe_prune", broken)
    r = httpx.post(
        f"{live.url}/v1/sync/Login",
        content=sync_body(),
        headers={"Authorization": "Bearer token-h1", "Content-Type": content_type("msgpack")},
        timeout=10,
    )
    assert r.status_code == 500
    assert r.json()["code"] == "internal"
    assert value(samples(live), "syncunit_refused_requests_total", code="internal") == 1


def test_a_locked_sqlite_database_is_a_503_the_device_retries(ops, backend, tmp_path):
    """A back-office writer holding SQLite's write lock past the busy timeout: the push
    is answered 503 with Retry-After (not a 500), counted, and goes through later."""
    if backend != "sqlite":
        pytest.skip("SQLite's write lock")
    srv, live = ops
    engine = srv.store.engine
    event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout = 100"))
    engine.dispose()  # connections from now on give up after 0.1 s
    with SyncClient(live.url, tmp_path / "d.sqlite", token="token-h1", chunk_size=500) as c:
        c.sync("Login")
        [(key,)] = c.store.conn.execute("SELECT id FROM LocalAppointment LIMIT 1").fetchall()
        c.update("LocalAppointment", key, {"notes": "seen"})
        office = sqlite3.connect(engine.url.database, isolation_level=None)
        office.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(ProblemError) as refused:
                c.sync("SendAppointments")
        finally:
            office.execute("ROLLBACK")
            office.close()
        assert refused.value.status == 503
        assert refused.value.code == "database-unavailable"
        assert refused.value.retryable
        assert c.sync("SendAppointments").applied == 1  # nothing lost: sent again
    data = samples(live)
    assert value(data, "syncunit_refused_requests_total", code="database-unavailable") == 1
    assert value(data, "syncunit_refused_requests_total", code="internal") == 0


def test_request_bytes_are_counted_as_they_travelled(ops):
    _, live = ops
    raw = sync_body(encoding="json")
    raw = raw[:-1] + b" " * 100_000 + b"}"  # JSON whitespace: the same request, larger
    packed = gzip.compress(raw)
    r = httpx.post(
        f"{live.url}/v1/sync/Login",
        content=packed,
        headers={
            "Authorization": "Bearer token-h1",
            "Content-Type": content_type("json"),
            "Content-Encoding": "gzip",
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert value(samples(live), "syncunit_request_bytes_total", unit="Login") == len(packed)
