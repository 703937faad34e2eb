"""Sync moments of the app: start, login, periodic, offline and reconnect, and restarts.

The method's units at their moments: ``sync_on_start`` (Splash) when the app
starts, ``login(token)`` runs the Login unit synchronously, ``sync_every`` queues a
unit periodically, and coming back online runs the Online unit with
``discard_pending``. The queue lives in the local database: what was pending when
the app stopped (or died) runs after a restart, nothing lost and nothing doubled.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hospital.models import appointment

from syncunit.client.scheduler import RetryPolicy
from syncunit.errors import AuthError, SyncCancelled
from tests.support import appointments_of, doctors_of, local_keys
from tests.test_scheduler import Events, booking, idle, queue_rows, wait_until


def server_ids(store, keys) -> list[str]:
    """The appointment keys among ``keys`` on the server, repeats kept."""
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(appointment.c.id).where(appointment.c.id.in_(list(keys)))
            ).scalars()
        )


def server_count(store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(appointment)).scalar_one())


# -- 5. offline and reconnect -----------------------------------------------------------------


def test_offline_the_worker_waits_and_trigger_still_queues(make_client, net, store):
    events = Events()
    c = make_client(transport=net, sync_on_reconnect="Online", **events.kwargs())
    c.sync("Login")
    net.units.clear()

    c.set_online(False)
    assert c.trigger("Splash") is True
    assert c.trigger("Login") is True
    assert c.trigger("Login") is False
    key = c.insert("LocalAppointment", booking(5))  # booked while offline

    s = c.status
    assert (s.state, s.online, s.queued) == ("offline", False, ["Splash", "Login"])
    assert s.pending_mutations == 1
    assert c.scheduler.running  # the worker is there...
    assert c.scheduler.step() is False  # ...and runs nothing while offline
    assert net.units == []

    c.set_online(True)

    events.wait(lambda: "Online" in events.completed())
    wait_until(lambda: idle(c))
    assert net.units == ["Online"]  # Splash and Login were discarded: Online does it all
    assert events.completed()[-1] == "Online"
    assert c.status.state == "idle"
    assert c.status.pending_mutations == 0
    assert server_ids(store, [key]) == [key]  # the offline booking reached the server
    assert key in local_keys(c, "LocalAppointment")
    assert c.store.last_sync_on("Splash") is None


def test_reconnect_discards_before_the_worker_can_pick_a_stale_unit(make_client, net, monkeypatch):
    """The worker may run at any moment after it is woken: model that by stepping inside
    ``wake()``. Coming back online must not let it start a unit that the reconnect
    unit's ``discard_pending`` is about to drop."""
    c = make_client(transport=net, sync_on_reconnect="Online")
    c.catalog()
    c.set_online(False)
    c.scheduler.enqueue("Splash")
    c.scheduler.enqueue("Login")
    monkeypatch.setattr(c.scheduler, "start", lambda: None)  # no thread: wake() steps
    monkeypatch.setattr(c.scheduler, "wake", lambda: c.scheduler.step())

    c.set_online(True)

    assert net.units == ["Online"]
    assert queue_rows(c) == []


def test_back_online_retries_at_once(make_client, net, clock):
    c = make_client(transport=net, clock=clock)  # no reconnect unit: just retry
    c.scheduler.rand = lambda: 0.5
    c.catalog()
    net.fail("offline")
    c.scheduler.enqueue("Login")
    c.scheduler.step()
    c.scheduler.step()
    assert queue_rows(c) == [("Login", "pending", 1, clock() + 1)]
    assert c.status.state == "offline"

    net.heal()
    c.set_online(True)  # the app hears the network is back (no clock advance)

    assert c.scheduler.step() is True
    assert queue_rows(c) == []
    assert c.status.state == "idle"
    assert net.units == ["Login", "Login"]


def test_set_online_false_then_true_retries_at_once(make_client, net, clock):
    c = make_client(transport=net, clock=clock)
    c.scheduler.rand = lambda: 0.5
    c.catalog()
    net.fail(503)
    c.scheduler.enqueue("Splash")
    c.scheduler.step()
    assert c.status.state == "retrying"
    c.set_online(False)
    assert c.status.state == "offline"
    assert c.scheduler.step() is False

    net.heal()
    c.set_online(True)

    assert c.scheduler.step() is True
    assert c.store.last_sync_on("Splash") is not None


def test_a_sync_that_succeeds_ends_the_offline_status(make_client, net):
    """The worker saw the network fail, then the app synced and the server answered:
    the device is not offline (the failed unit only waits for its retry), and close()
    runs the units due, as it does when no failure was seen."""
    c = make_client(transport=net, retry=RetryPolicy(base_delay=60, max_delay=60))
    c.catalog()
    net.fail("offline")
    c.trigger("Splash")
    wait_until(lambda: c.status.state == "offline")
    net.heal()

    c.sync("Login")

    assert (c.status.state, c.status.queued) == ("retrying", ["Splash"])
    net.hold()
    c.trigger("SendAppointments")
    assert net.wait_for_requests(3)  # Splash, Login, then the worker's SendAppointments
    c.trigger("Login")  # due, behind the running unit
    closing = threading.Thread(target=c.close)
    closing.start()
    time.sleep(0.2)  # close() waits for what is due...
    net.release()
    closing.join(30)
    assert not closing.is_alive()
    assert net.units == ["Splash", "Login", "SendAppointments", "Login"]  # ...Login too


def test_going_online_when_already_online_triggers_nothing(make_client, net):
    c = make_client(transport=net, sync_on_reconnect="Online")
    c.set_online(True)
    assert c.status.queued == []
    assert not c.scheduler.running
    assert net.units == []


# -- start, login, periodic ---------------------------------------------------------------------


def test_sync_on_start_runs_at_start(make_client, store):
    events = Events()
    c = make_client(sync_on_start="Splash", **events.kwargs())
    assert not c.scheduler.running
    assert c.status.queued == []  # nothing before start()

    c.start()

    events.wait(lambda: events.completed() == ["Splash"])
    assert [t for n, _, t in events.log if n == "complete"] == ["syncunit-worker"]
    rows = c.store.rows("LocalSummary", ["doctor_id"])
    assert sorted(r[0] for r in rows) == doctors_of(store, 1)


def test_login_runs_the_login_unit_synchronously(make_client, in_sync, store):
    events = Events()
    c = make_client(None, sync_on_login="Login", **events.kwargs())

    result = c.login("token-h1")

    assert result is not None
    assert result.unit == "Login"
    assert result.rows_in == {"LocalDoctor": 10, "LocalAppointment": 200}
    assert local_keys(c, "LocalAppointment") == set(appointments_of(store, 1))  # already there
    assert [t for n, _, t in events.log if n == "complete"] == [threading.current_thread().name]
    assert not c.scheduler.running  # no background work was needed
    in_sync(c)


def test_login_with_a_bad_token_raises(make_client):
    c = make_client(None, sync_on_login="Login")
    with pytest.raises(AuthError):
        c.login("not-a-token")
    assert c.status.queued == []


def test_sync_every_queues_the_unit_periodically(make_client, net, clock):
    c = make_client(transport=net, clock=clock, sync_every=("Splash", 60.0))

    assert c.scheduler.step() is False  # the first tick starts the period
    clock.advance(59.9)
    assert c.scheduler.step() is False
    clock.advance(0.1)
    assert c.scheduler.step() is True  # 60 s: queued and run
    assert net.units == ["Splash"]
    clock.advance(30)
    assert c.scheduler.step() is False
    clock.advance(30)
    assert c.scheduler.step() is True
    assert net.units == ["Splash", "Splash"]

    c.set_online(False)  # offline: the period still queues the unit, once
    for _ in range(3):
        clock.advance(60)
        assert c.scheduler.step() is False
    assert queue_rows(c) == [("Splash", "pending", 0, 0.0)]
    c.set_online(True)
    assert c.scheduler.step() is True
    assert net.units == ["Splash"] * 3


def test_sync_every_with_the_worker_thread(make_client):
    done = threading.Event()
    c = make_client(sync_every=("Splash", 0.05), on_complete=lambda r: done.set())
    c.start()
    assert done.wait(15)
    assert c.store.last_sync_on("Splash") is not None


# -- 6. the queue survives a restart ------------------------------------------------------------


def test_pending_units_and_local_rows_survive_a_restart(make_client, net, clock, store):
    first = make_client(transport=net, clock=clock)  # its clock is far in the past
    first.sync("Login")
    keys = [first.insert("LocalAppointment", booking(m)) for m in (0, 20, 40)]
    net.fail("offline")
    first.trigger("SendAppointments")
    first.trigger("Splash")
    wait_until(lambda: [r[2] for r in queue_rows(first)] == [1, 1])  # both tried and failed
    first.close()  # the app stops with the work undone
    assert server_ids(store, keys) == []
    before = server_count(store)

    events = Events()
    second = make_client(name="device", **events.kwargs())  # the same local file
    assert second.status.queued == ["SendAppointments", "Splash"]
    assert second.status.pending_mutations == 3
    second.start()

    events.wait(lambda: len(events.completed()) == 2)
    wait_until(lambda: idle(second))
    assert events.completed() == ["SendAppointments", "Splash"]  # in their order
    assert sorted(server_ids(store, keys)) == sorted(keys)  # each exactly once
    assert server_count(store) == before + 3
    assert second.status.pending_mutations == 0
    assert second.outbox.rejected() == []
    assert queue_rows(second) == []


def test_close_runs_the_units_triggered_before_it(make_client, store):
    """A script that triggers a push and closes (the README's device) loses nothing:
    close() lets the worker run what is due before it stops."""
    c = make_client()
    c.sync("Login")
    key = c.insert("LocalAppointment", booking(50))
    c.trigger("Splash")
    c.trigger("SendAppointments")  # behind Splash: not started when close() is called
    c.close()
    assert server_ids(store, [key]) == [key]
    done = sqlite3.connect(c.store.path)
    try:
        assert done.execute("SELECT count(*) FROM syncunit_outbox").fetchone() == (0,)
        assert done.execute("SELECT count(*) FROM syncunit_queue").fetchone() == (0,)
    finally:
        done.close()


def test_a_response_lost_before_a_restart_is_not_applied_twice(make_client, net, clock, store):
    first = make_client(transport=net, clock=clock)  # so its retry is long due after restart
    first.sync("Login")
    keys = [first.insert("LocalAppointment", booking(m)) for m in (0, 20)]
    net.fail("lost", unit="SendAppointments")  # the server applies it; the answer is lost
    first.scheduler.enqueue("SendAppointments")
    first.scheduler.step()
    assert server_ids(store, keys) != []  # it did reach the server
    assert first.status.queued == ["SendAppointments"]
    assert first.status.pending_mutations == 2  # the client does not know it arrived
    first.close()
    before = server_count(store)

    events = Events()
    second = make_client(name="device", **events.kwargs())
    second.start()
    events.wait(lambda: events.completed() == ["SendAppointments"])

    [(result,)] = events.of("complete")
    assert result.rejected == []
    assert result.conflicts == []
    assert sorted(server_ids(store, keys)) == sorted(keys)
    assert server_count(store) == before  # nothing doubled
    assert second.status.pending_mutations == 0


def test_a_unit_running_when_the_process_died_runs_again(make_client, tmp_path, store):
    first = make_client()
    first.sync("Login")
    first.close()
    db = sqlite3.connect(tmp_path / "device.sqlite", isolation_level=None)
    try:  # the process died while Splash ran, with another Splash and a Login waiting
        db.executemany(
            "INSERT INTO syncunit_queue (unit, state, attempts, next_at, queued_at)"
            " VALUES (?, ?, 0, 0, 0)",
            [("Splash", "running"), ("Splash", "pending"), ("Login", "pending")],
        )
    finally:
        db.close()

    events = Events()
    second = make_client(name="device", **events.kwargs())
    second.start()

    events.wait(lambda: len(events.completed()) == 2)
    wait_until(lambda: idle(second))
    assert events.completed() == ["Splash", "Login"]  # Splash once, first
    assert queue_rows(second) == []
    rows = second.store.rows("LocalSummary", ["doctor_id"])
    assert sorted(r[0] for r in rows) == doctors_of(store, 1)


def test_a_second_client_starting_leaves_the_run_of_the_first_alone(make_client, net):
    """Two clients of one database (an app and its background service): the worker of
    the second, started while the first's runs a unit, must not take that run for one
    a dead process left: one trigger is one run."""
    first_events, second_events = Events(), Events()
    first = make_client(transport=net, **first_events.kwargs())
    first.catalog()
    net.hold()
    first.trigger("Login")
    assert net.wait_for_requests(1)

    second = make_client(**second_events.kwargs())  # the same file
    second.start()
    second.trigger("Splash")  # either worker runs it, after Login
    net.release()

    def completed() -> list[str]:
        return first_events.completed() + second_events.completed()

    first_events.wait(lambda: "Login" in first_events.completed())
    wait_until(lambda: "Splash" in completed())
    wait_until(lambda: idle(first) and idle(second))
    assert sorted(completed()) == ["Login", "Splash"]  # Login once, not once more
    assert queue_rows(first) == []


# -- close() while a unit runs ------------------------------------------------------------


class HeldPush(httpx.BaseTransport):
    """The real network, except that the second push request is held until ``release()``
    returns true, then cut: close() finds the unit mid-run, between two batches."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.pushes = 0
        self.holding = threading.Event()
        self.release: Callable[[], bool] = lambda: True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/sync/"):
            self.pushes += 1
            if self.pushes == 2:
                self.holding.set()
                wait_until(self.release)
                raise httpx.ReadError("the connection was cut", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_close_cancelling_a_running_unit_keeps_it_queued(make_client, store):
    """A run close() cancels is not a failure: its unit stays queued (not dropped),
    on_error hears nothing, and the next start() pushes what the outbox still holds."""
    make_client().sync("Login")
    events = Events()
    held = HeldPush()
    c = make_client(name="device", transport=held, push_batch=1, **events.kwargs())
    c.pipeline = False
    keys = [c.insert("LocalAppointment", booking(m)) for m in (0, 10, 20, 30)]
    held.release = c._cancel.is_set  # let the held request go once close() cancels
    c.start()
    c.trigger("SendAppointments")
    assert held.holding.wait(15)
    c.close(timeout=0.2)

    assert events.errors() == []
    db = sqlite3.connect(c.store.path)
    try:
        assert db.execute(
            "SELECT unit, state, attempts, next_at FROM syncunit_queue"
        ).fetchall() == [("SendAppointments", "pending", 0, 0)]
        assert db.execute("SELECT count(*) FROM syncunit_outbox").fetchone()[0] > 0
    finally:
        db.close()

    again = Events()
    second = make_client(name="device", **again.kwargs())
    second.start()
    again.wait(lambda: again.completed() == ["SendAppointments"])
    assert again.errors() == []
    assert sorted(server_ids(store, keys)) == sorted(keys)  # each exactly once
    assert second.status.pending_mutations == 0


class Silent:
    """A server on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, name="silent-server", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent() -> Any:
    s = Silent()
    yield s
    s.close()


def hanging_device(make_client, silent: Silent, events: Events):
    """A device with a first copy and one change, now talking to ``silent``."""
    make_client().sync("Login")
    c = make_client(name="device", url=silent.url, timeout=60.0, **events.kwargs())
    key = c.insert("LocalAppointment", booking(40))
    return c, key


def assert_kept(path, key, queued, make_client, store) -> None:
    """``queued`` waits in the queue, the change in the outbox; a next run sends it."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT unit, state, attempts FROM syncunit_queue").fetchall() == queued
        assert db.execute("SELECT count(*) FROM syncunit_outbox").fetchone() == (1,)
    finally:
        db.close()
    again = Events()
    c = make_client(name="device", **again.kwargs())
    c.trigger("SendAppointments")
    again.wait(lambda: again.completed() == ["SendAppointments"])
    assert server_ids(store, [key]) == [key]


def test_close_does_not_wait_for_a_server_that_never_answers(make_client, store, silent):
    """close(timeout) cuts the connection of a sync blocked reading a silent server:
    it does not wait for the read timeout (60 s here), and nothing is lost."""
    events = Events()
    c, key = hanging_device(make_client, silent, events)
    c.start()
    c.trigger("SendAppointments")
    wait_until(lambda: silent.accepted and c.status.unit == "SendAppointments")
    started = time.monotonic()
    c.close(timeout=0.5)
    assert time.monotonic() - started < 30  # well under the read timeout
    assert not c.scheduler.running
    assert events.errors() == []
    assert_kept(c.store.path, key, [("SendAppointments", "pending", 0)], make_client, store)


def test_close_cancels_a_sync_an_app_thread_waits_on(make_client, store, silent):
    """The same for a sync() called on an app thread: it raises SyncCancelled."""
    events = Events()
    c, key = hanging_device(make_client, silent, events)
    raised: list[BaseException] = []

    def app_thread() -> None:
        try:
            c.sync("SendAppointments")
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=app_thread, name="app")
    t.start()
    wait_until(lambda: silent.accepted)
    started = time.monotonic()
    c.close(timeout=0.5)
    assert time.monotonic() - started < 30
    t.join(15)
    assert [type(e) for e in raised] == [SyncCancelled]  # the app's call, told so
    assert events.errors() == []
    assert_kept(c.store.path, key, [], make_client, store)
