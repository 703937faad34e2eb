"""What an app builds on: reactive local queries, a status listener, an asyncio client.

Against the live hospital server over real HTTP and real SQLite files:

* ``watch_query`` hands over the rows at once, again after a sync or a local
  write changes a table the query reads (coalesced: a download of many chunks
  gives a few calls, the last with the final rows), not for other tables, not
  for a rolled-back write, also for a write by another connection, through the
  app's ``dispatch``, and never after ``cancel()``;
* ``on_status`` tells download and upload progress and the last error, never
  the same status twice;
* ``AsyncSyncClient`` runs the same engine with awaitable calls and delivers
  status and query results on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from syncunit import (
    AsyncSyncClient,
    LocalStoreError,
    NetworkError,
    RequestRejected,
    SyncClient,
    SyncStatus,
)
from syncunit.client.scheduler import subscription_id
from tests.support import LiveServer
from tests.test_scheduler import booking

APPTS = "SELECT id, notes FROM LocalAppointment ORDER BY id"


class Calls:
    """Results handed to a callback, with a way to wait for the next ones."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.threads: set[int] = set()
        self._cond = threading.Condition()

    def __call__(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self.threads.add(threading.get_ident())
            self._cond.notify_all()

    def wait_for(self, done: Callable[[list[Any]], bool], timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: done(self.items), timeout), self.items[-3:]

    def settle(self, seconds: float = 0.4) -> list[Any]:
        time.sleep(seconds)  # longer than the watcher's coalescing interval
        with self._cond:
            return list(self.items)


def table(client: SyncClient, sql: str = APPTS) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in client.store.query(sql)]


# -- watch_query ----------------------------------------------------------------------------


def test_a_download_of_many_chunks_gives_a_few_calls_ending_with_the_final_rows(make_client):
    client = make_client()
    client.sync("Splash")  # the catalog and the local tables, no appointment yet
    calls = Calls()
    client.watch_query(APPTS, (), calls)
    calls.wait_for(lambda items: len(items) == 1)
    assert calls.items[0] == []
    # Runs at most every 0.5 s: on a loaded machine a chunk can take longer than the
    # default 50 ms to arrive, and every chunk would then get a call of its own.
    assert client._watcher is not None
    client._watcher.interval = 0.5

    result = client.sync("Login")  # chunks of 16 rows

    chunks = result.total_in // 16
    assert chunks > 8
    final = table(client)
    calls.wait_for(lambda items: items[-1] == final)
    assert len(calls.settle(1.0)) < chunks  # coalesced
    assert all(a != b for a, b in itertools.pairwise(calls.items))


def test_local_writes_fire_for_the_tables_read_and_only_those(make_client):
    client = make_client()
    client.sync("Login")
    calls = Calls()
    live = client.watch_query(
        "SELECT count(*) FROM LocalAppointment WHERE notes = ?", ("x",), calls
    )
    assert live.tables == {"LocalAppointment"}
    calls.wait_for(lambda items: len(items) == 1)

    key = table(client)[0][0]
    client.update("LocalAppointment", key, {"notes": "x"})
    calls.wait_for(lambda items: items[-1] == [(1,)])
    with client.store.atomic() as c:  # plain SQL on the client's connection
        c.execute("UPDATE LocalAppointment SET notes = 'x' WHERE id != ?", (key,))
    calls.wait_for(lambda items: items[-1][0][0] > 1)
    seen = len(calls.settle())

    doctor = client.store.query("SELECT id FROM LocalDoctor LIMIT 1")[0][0]
    with client.store.atomic() as c:  # another table: nothing to say
        c.execute("UPDATE LocalDoctor SET name = 'Dr Who' WHERE id = ?", (doctor,))

    def rolled_back() -> None:
        with client.store.atomic() as c:
            c.execute("UPDATE LocalAppointment SET notes = 'y'")
            time.sleep(0.3)  # the watcher wakes meanwhile: it must wait for the end
            raise RuntimeError("the app changed its mind")

    with pytest.raises(RuntimeError):
        rolled_back()
    assert len(calls.settle()) == seen


def test_a_burst_of_writes_gives_one_call(make_client):
    client = make_client()
    client.sync("Login")
    calls = Calls()
    client.watch_query(APPTS, (), calls)
    calls.wait_for(lambda items: len(items) == 1)
    keys = [row[0] for row in table(client)[:20]]
    with client.store.lock:  # twenty transactions before the watcher may look
        for n, key in enumerate(keys):
            client.update("LocalAppointment", key, {"notes": f"burst {n}"})
    final = table(client)
    calls.wait_for(lambda items: items[-1] == final)
    assert len(calls.settle()) == 2  # the first rows, then the rows after the burst


def test_a_write_by_another_connection_is_seen(make_client, tmp_path):
    client = make_client(name="shared")
    client.sync("Login")
    calls = Calls()
    client.watch_query("SELECT count(*) FROM LocalAppointment", (), calls)
    calls.wait_for(lambda items: len(items) == 1)
    before = calls.items[0][0][0]
    other = sqlite3.connect(tmp_path / "shared.sqlite", timeout=30)
    with other:
        other.execute(
            "DELETE FROM LocalAppointment WHERE id IN (SELECT id FROM LocalAppointment LIMIT 2)"
        )
    other.close()
    calls.wait_for(lambda items: items[-1] == [(before - 2,)])


def test_a_watched_query_that_fails_holds_back_no_other(make_client, tmp_path):
    """A table a watched query reads is dropped (a catalog change drops a stream's
    table): that query keeps its error, and the others still see every write."""
    client = make_client(name="shared")
    client.sync("Login")
    client.store.conn.execute("CREATE TABLE app_scratch (n INTEGER)")
    gone = client.watch_query("SELECT count(*) FROM app_scratch")  # first in the list
    calls = Calls()
    client.watch_query("SELECT count(*) FROM LocalAppointment", (), calls)
    calls.wait_for(lambda items: len(items) == 1)
    before = calls.items[0][0][0]
    client.store.conn.execute("DROP TABLE app_scratch")
    other = sqlite3.connect(tmp_path / "shared.sqlite", timeout=30)
    with other:  # another connection: every watched query runs again
        other.execute(
            "DELETE FROM LocalAppointment WHERE id IN (SELECT id FROM LocalAppointment LIMIT 2)"
        )
    other.close()
    calls.wait_for(lambda items: items[-1] == [(before - 2,)])
    assert "no such table: app_scratch" in str(gone.error)


def test_callbacks_go_through_dispatch_and_stop_when_cancelled(make_client):
    client = make_client()
    client.sync("Login")
    ui: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    def ui_thread() -> None:  # what a toolkit's main loop does with posted calls
        while (call := ui.get()) is not None:
            call()

    thread = threading.Thread(target=ui_thread)
    thread.start()
    try:
        calls = Calls()
        live = client.watch_query(APPTS, (), calls, dispatch=ui.put)
        key = table(client)[0][0]
        client.update("LocalAppointment", key, {"notes": "seen"})
        calls.wait_for(lambda items: len(items) >= 2)
        assert calls.threads == {thread.ident}

        live.cancel()
        count = len(calls.settle())
        client.update("LocalAppointment", key, {"notes": "again"})
        assert len(calls.settle()) == count
        assert list(live) == calls.items  # the iterator saw the same results, then ended
    finally:
        ui.put(None)
        thread.join(5)


def test_the_live_query_is_an_iterator_of_results(make_client):
    client = make_client()
    client.sync("Login")
    live = client.watch_query("SELECT count(*) FROM LocalAppointment")
    results = iter(live)
    first = next(results)
    key = table(client)[0][0]
    client.delete("LocalAppointment", key)
    assert next(results) == [(first[0][0] - 1,)]
    live.cancel()
    assert list(results) == []


# -- on_status ------------------------------------------------------------------------------


def test_status_tells_download_progress_and_ends_idle(make_client):
    statuses = Calls()
    client = make_client(on_status=statuses)
    result = client.sync("Login")
    items: list[SyncStatus] = statuses.items
    downloads = [s.download for s in items if s.download is not None]
    assert len(downloads) > 3
    assert all(d.unit == "Login" for d in downloads)
    done = [d.done for d in downloads]
    assert done == sorted(done)
    assert downloads[-1].done == downloads[-1].total == result.total_in + result.total_removed
    assert items[-1].download is None
    assert items[-1].state == "idle"
    assert all(a != b for a, b in itertools.pairwise(items))  # never twice the same


def test_status_tells_upload_progress(make_client):
    statuses = Calls()
    client = make_client(on_status=statuses)
    client.sync("Login")
    for minute in range(3):
        client.insert("LocalAppointment", booking(minute * 2))
    pending = [s for s in statuses.items if s.pending_mutations]
    client.sync("SendAppointments")
    uploads = [s.upload for s in statuses.items if s.upload is not None]
    assert [(u.done, u.total) for u in uploads] == [(0, 3), (3, 3)]
    assert statuses.items[-1].upload is None
    assert statuses.items[-1].pending_mutations == 0
    assert pending == []  # local writes alone tell nothing until the engine runs


def test_status_tells_the_last_error(make_client, tmp_path):
    statuses = Calls()
    client = make_client(on_status=statuses, url="http://127.0.0.1:9", timeout=2.0)
    with pytest.raises(NetworkError):
        client.sync("Login")
    last = statuses.items[-1]
    assert last.last_error_unit == "Login"
    assert "cannot reach the server" in (last.last_error or "")
    assert client.status.last_error == last.last_error


# -- AsyncSyncClient ------------------------------------------------------------------------


def test_the_async_client_syncs_and_hands_results_to_the_loop(live: LiveServer, tmp_path):
    async def app() -> dict[str, Any]:
        loop_thread = threading.get_ident()
        threads: set[int] = set()
        statuses: list[SyncStatus] = []

        def on_status(status: SyncStatus) -> None:
            threads.add(threading.get_ident())
            statuses.append(status)

        async with AsyncSyncClient(
            live.url, tmp_path / "async.sqlite", token="token-h1", chunk_size=16
        ) as client:
            client.on_status = on_status
            result = await client.sync("Login")
            rows = await client.query("SELECT count(*) FROM LocalAppointment")
            updates = client.query_updates("SELECT count(*) FROM LocalAppointment")
            first = await anext(updates)
            await client.insert("LocalAppointment", booking(30))
            second = await asyncio.wait_for(anext(updates), 10)
            await updates.aclose()
            await asyncio.sleep(0.05)  # the last status calls posted to the loop
            with pytest.raises(NetworkError):
                await AsyncSyncClient(client=SyncClient("http://127.0.0.1:9", ":memory:")).sync(
                    "Login"
                )
        return {
            "loop": loop_thread,
            "threads": threads,
            "statuses": statuses,
            "rows": rows,
            "first": first,
            "second": second,
            "total_in": result.total_in,
        }

    out = asyncio.run(app())
    assert out["total_in"] > 0
    assert out["rows"] == out["first"]
    assert out["second"] == [(out["first"][0][0] + 1,)]
    assert out["threads"] == {out["loop"]}  # every status call ran on the loop's thread
    assert any(s.download is not None for s in out["statuses"])


def test_the_async_client_calls_the_callbacks_given_as_options_on_the_loop(
    live: LiveServer, tmp_path
):
    """``on_status`` and the sync events given to the constructor run on the loop, as
    ``on_status`` set afterwards does: not on the thread that ran the sync."""

    async def app() -> tuple[int, dict[str, set[int]]]:
        threads: dict[str, set[int]] = {}

        def seen(name: str) -> Callable[..., None]:
            return lambda *args: threads.setdefault(name, set()).add(threading.get_ident())

        async with AsyncSyncClient(
            live.url,
            tmp_path / "async.sqlite",
            token="token-h1",
            chunk_size=16,
            on_status=seen("on_status"),
            on_start=seen("on_start"),
            on_progress=seen("on_progress"),
            on_complete=seen("on_complete"),
            on_error=seen("on_error"),
        ) as client:
            await client.sync("Login")
            with pytest.raises(RequestRejected):
                await client.sync("PatientDetails")  # its parameter is missing
            await asyncio.sleep(0.05)  # the last status calls posted to the loop
        return threading.get_ident(), threads

    loop_thread, threads = asyncio.run(app())
    assert sorted(threads) == ["on_complete", "on_error", "on_progress", "on_start", "on_status"]
    assert all(seen == {loop_thread} for seen in threads.values()), threads


def test_the_async_client_refuses_options_beside_an_existing_client(tmp_path):
    async def app() -> None:
        engine = SyncClient("http://127.0.0.1:9", tmp_path / "d.sqlite")
        try:
            with pytest.raises(TypeError, match="on_error"):
                AsyncSyncClient(client=engine, on_error=print)
            shown: list[SyncStatus] = []
            client = AsyncSyncClient(client=engine, on_status=shown.append)
            assert client.on_status is not None
            assert engine.dispatch is not None  # handed to the loop
        finally:
            engine.close()

    asyncio.run(app())


def test_the_async_clients_query_raises_only_syncunit_errors(tmp_path):
    """As the threaded ``store.query``: a driver error becomes ``LocalStoreError``."""

    async def app() -> None:
        async with AsyncSyncClient("http://127.0.0.1:9", tmp_path / "d.sqlite", token="t") as c:
            # Before a first sync brought the catalog, there is no local table yet.
            with pytest.raises(LocalStoreError, match="no such table: LocalDoctor"):
                await c.query("SELECT * FROM LocalDoctor")
            with pytest.raises(LocalStoreError, match="syntax error"):
                await c.query("SELEKT 1")

    asyncio.run(app())


def test_the_async_client_takes_a_units_params_like_the_sync_one(live: LiveServer, store, tmp_path):
    from tests.test_subscriptions import patients_of

    patient = patients_of(store, 1)[0]
    wanted = {"patient_id": patient}

    async def app() -> tuple[Any, list[tuple[str, dict[str, Any]]], bool]:
        async with AsyncSyncClient(live.url, tmp_path / "a.sqlite", token="token-h1") as client:
            await client.sync("Login")
            result = await client.sync("PatientDetails", wanted, keep_for=3600)
            queued = client.trigger("PatientDetails", params=wanted)
            return result, client.client.subscriptions(), queued

    result, subscriptions, queued = asyncio.run(app())
    assert result.unit == subscription_id("PatientDetails", wanted)
    assert result.total_in > 0
    assert subscriptions == [("PatientDetails", wanted)]
    assert queued
