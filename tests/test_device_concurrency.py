"""Several clients on one device database: their syncs take turns.

* two ``SyncClient`` objects on one file: a pull read before the other's push is
  applied after it, not in the middle (the push is not undone, and the next edit is
  no conflict with the app's own write);
* a client opened before another applied a new catalog learns it before it syncs
  (no outbox triggers come back on a table no unit pushes);
* two processes on one file: a sync waits for the other's, and past its
  ``lock_timeout`` raises ``DeviceBusy`` naming the process that holds it;
* a sync that fails lets the next one go.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hospital import units as hu

from syncunit.client import applying
from syncunit.client.devicelock import LOCK_SUFFIX, DeviceLock
from syncunit.errors import DeviceBusy, NetworkError
from syncunit.units import SyncSchema, SyncUnit
from tests.conftest import FaultyNetwork


class HeldResponse(httpx.BaseTransport):
    """Reads a sync response whole from the server, then holds it until released: the
    response says the server's state before anything that happens meanwhile."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.hold = False
        self.got = threading.Event()
        self.release = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not (self.hold and request.url.path.startswith("/v1/sync/")):
            return response
        body = response.read()
        response.close()
        self.got.set()
        assert self.release.wait(30), "HeldResponse: never released"
        skip = ("content-encoding", "content-length")
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in skip]
        return httpx.Response(response.status_code, headers=headers, content=body)

    def close(self) -> None:
        self.release.set()
        self.inner.close()


class Background:
    """``call`` on a thread; ``settled`` is set once it returned, or once it waits for the
    database's sync lock (``waiting_for_lock``)."""

    def __init__(self, call: Callable[[], Any], settled: threading.Event) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.settled = settled
        self.thread = threading.Thread(target=self._run, args=(call,))
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as exc:
            self.error = exc
        finally:
            self.settled.set()

    def join(self) -> Any:
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def waiting_for_lock(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set when a run finds the database's sync lock taken and waits."""
    waiting = threading.Event()
    check = DeviceLock._check

    def spy(self: DeviceLock, *args: Any, **kwargs: Any) -> None:
        waiting.set()
        check(self, *args, **kwargs)

    monkeypatch.setattr(DeviceLock, "_check", spy)
    return waiting


def test_a_pull_read_before_another_clients_push_does_not_undo_it(
    make_client, plain_sql, monkeypatch
):
    app = make_client()
    app.sync("Login")
    held = HeldResponse()
    service = make_client(transport=held)  # the same device file
    key = app.store.query("SELECT id FROM LocalAppointment ORDER BY id LIMIT 1")[0][0]
    plain_sql("UPDATE appointment SET room = 'r2' WHERE id = ?", (key,))
    held.hold = True
    settled = waiting_for_lock(monkeypatch)
    pull = Background(lambda: service.sync("Login"), threading.Event())
    assert held.got.wait(30)  # the pull's answer is read: the server's state before the push
    app.update("LocalAppointment", key, {"notes": "mine"})
    push = Background(lambda: app.sync("SendAppointments"), settled)
    assert settled.wait(30)  # the push waits for the pull (or, unlocked, has run)
    held.release.set()
    pull.join()
    assert push.join().applied == 1

    def notes() -> tuple[Any, Any]:
        (device,) = app.store.query("SELECT notes FROM LocalAppointment WHERE id = ?", (key,))
        (server,) = plain_sql("SELECT notes FROM appointment WHERE id = ?", (key,))
        return device[0], server[0]

    assert notes() == ("mine", "mine")
    app.update("LocalAppointment", key, {"notes": "mine again"})
    result = app.sync("SendAppointments")
    assert (result.applied, result.conflicts) == (1, [])
    assert notes() == ("mine again", "mine again")


def test_a_client_opened_before_a_new_catalog_learns_it_before_it_syncs(
    make_client, make_server, live, plain_sql, monkeypatch
):
    monkeypatch.setattr(applying, "BULK_ROWS", 8)  # chunks of 16: each swaps the triggers
    app = make_client()
    app.sync("Login")
    service = make_client()  # the same device file, opened while appointments are pushed

    def triggers() -> list[str]:
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?"
        return [r[0] for r in app.store.query(sql, ("LocalAppointment",))]

    assert triggers()
    # The server stops taking appointments: no unit pushes them.
    pull_only = SyncSchema(
        [
            SyncUnit("Login", [hu.doctors, hu.appointments]),
            SyncUnit("Online", [hu.summary, hu.doctors, hu.appointments], direction="pull"),
        ]
    )
    live.app = make_server(pull_only).app
    app.sync("Login")
    assert triggers() == []
    plain_sql("UPDATE appointment SET room = 'moved'")
    assert service.sync("Login").rows_in["LocalAppointment"] > 16
    assert triggers() == []  # not made again from what the service knew when it opened
    assert "LocalAppointment" not in service.store.pushed
    key = app.store.query("SELECT id FROM LocalAppointment LIMIT 1")[0][0]
    app.store.conn.execute("UPDATE LocalAppointment SET notes = 'draft' WHERE id = ?", (key,))
    assert app.outbox.count() == 0  # no change waits where nothing would push it


def test_a_sync_that_fails_lets_the_next_one_go(make_client, live):
    net = FaultyNetwork()
    failing = make_client(transport=net)
    net.fail("offline")
    with pytest.raises(NetworkError):
        failing.sync("Login")
    other = make_client(lock_timeout=5)
    assert other.sync("Login").total_in > 0


CHILD = """
import sys
from syncunit import SyncClient
from syncunit.errors import DeviceBusy
client = SyncClient(sys.argv[1], sys.argv[2], token="token-h1", lock_timeout=float(sys.argv[3]))
try:
    print("synced", client.sync("Login").total_in)
except DeviceBusy as exc:
    print("busy", exc)
client.close()
"""


def _child(url: str, path: Path, lock_timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(path), str(lock_timeout)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_processes_on_one_file_take_turns(make_client, live, tmp_path, plain_sql):
    held = HeldResponse()
    here = make_client(transport=held)
    here.sync("Login")
    plain_sql("UPDATE appointment SET room = 'r3'")
    held.hold = True
    pull = Background(lambda: here.sync("Login"), threading.Event())
    assert held.got.wait(30)
    # While this process's sync runs, another process's waits, then says who holds it.
    out = _child(live.url, tmp_path / "device.sqlite", 0.3)
    assert out.startswith("busy")
    assert f"in process {os.getpid()}" in out
    assert "sync of 'Login'" in out
    held.release.set()
    assert pull.join().total_in > 0
    out = _child(live.url, tmp_path / "device.sqlite", 30)
    assert out == "synced 0\n"  # its turn: nothing left to fetch
    assert (tmp_path / f"device.sqlite{LOCK_SUFFIX}").exists()


def test_a_run_that_waits_too_long_says_what_holds_the_database(make_client, monkeypatch):
    held = HeldResponse()
    first = make_client(transport=held)
    held.hold = True
    pull = Background(lambda: first.sync("Login"), threading.Event())
    assert held.got.wait(30)
    second = make_client(lock_timeout=0.2)
    with pytest.raises(DeviceBusy, match=r"sync of 'Login'.*in process"):
        second.sync("Login")
    held.release.set()
    pull.join()


def test_a_store_opening_while_another_applies_a_catalog_keeps_that_catalog_s_triggers(
    make_server: Callable[..., Any], store: Any, serve: Callable[[Any], Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A store checks its outbox triggers at open: another client applying a new catalog
    meanwhile (a column added) must not have its triggers put back to the old catalog's,
    which would leave the app's edits of the new column unrecorded."""
    from hospital.generate import generate

    from syncunit import SyncClient
    from syncunit.client.store import LocalStore
    from syncunit.units import Stream
    from tests.conftest import SIZE

    a = hu.appointments
    without_room = Stream(
        "appointments", a.base, {k: v for k, v in a.columns.items() if k != "room"},
        joins=a.joins, where=a.where, local_table="LocalAppointment", indexes=a.indexes,
        policy=a.policy, rules=a.rules,
    )  # fmt: skip
    old = SyncSchema(
        [SyncUnit("Login", [hu.doctors, without_room]),
         SyncUnit("SendAppointments", [without_room], direction="push")]
    )  # fmt: skip
    generate(store.engine, **SIZE)
    live = serve(make_server(old).app)
    path = tmp_path / "device.sqlite"
    with SyncClient(live.url, path, token="token-h1") as first:
        first.sync("Login")
    live.app = make_server(hu.schema).app  # the server's stream gains ``room``
    restore = LocalStore._restore_suspended

    def meanwhile(self: LocalStore, catalog: Any) -> None:
        monkeypatch.setattr(LocalStore, "_restore_suspended", restore)
        with SyncClient(live.url, path, token="token-h1") as other:
            other.sync("Login")  # applies the new catalog
        restore(self, catalog)

    monkeypatch.setattr(LocalStore, "_restore_suspended", meanwhile)
    with SyncClient(live.url, path, token="token-h1") as device:
        [(sql,)] = device.store.query(
            "SELECT sql FROM sqlite_master WHERE name = 'syncunit_LocalAppointment_au'"
        )
        assert '"room"' in sql
        key = device.store.query("SELECT id FROM LocalAppointment ORDER BY id LIMIT 1")[0][0]
        device.update("LocalAppointment", key, {"room": "R-999"})
        assert device.outbox.count() == 1
