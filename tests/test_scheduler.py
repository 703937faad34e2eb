"""The sync-moments scheduler: the persistent queue, one worker, retries, events, status.

``SyncClient.trigger`` queues a unit and returns at once; one worker runs the queue
in order, one sync at a time; a unit that fails on the network or with a 5xx is
retried with exponential backoff (and jitter) while the units behind it go ahead;
401, 403 and 422 are not retried. Timing is checked with an injected clock and
``scheduler.step()``; where the real worker thread runs, tests wait on events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from syncunit.client import SyncClient
from syncunit.client.scheduler import MAX_RETRY_AFTER, RetryPolicy
from syncunit.errors import (
    AuthError,
    LocalStoreError,
    NetworkError,
    ProblemError,
    RequestRejected,
)
from tests.support import appointments_of, local_keys, wait_until

LOGIN_ROWS = {"LocalDoctor": 10, "LocalAppointment": 200}


class Events:
    """Records every sync event (name, args, thread name) and lets tests wait for them."""

    def __init__(self) -> None:
        self.log: list[tuple[str, tuple[Any, ...], str]] = []
        self.cond = threading.Condition()

    def _add(self, name: str, *args: Any) -> None:
        with self.cond:
            self.log.append((name, args, threading.current_thread().name))
            self.cond.notify_all()

    def kwargs(self) -> dict[str, Any]:
        return {
            "on_start": lambda unit: self._add("start", unit),
            "on_progress": lambda unit, done, total: self._add("progress", unit, done, total),
            "on_complete": lambda result: self._add("complete", result),
            "on_error": lambda unit, exc: self._add("error", unit, exc),
        }

    def of(self, name: str) -> list[tuple[Any, ...]]:
        with self.cond:
            return [args for n, args, _ in self.log if n == name]

    def completed(self) -> list[str]:
        return [r.unit for (r,) in self.of("complete")]

    def errors(self) -> list[tuple[str, Exception]]:
        return [(u, e) for (u, e) in self.of("error")]

    def wait(self, predicate: Callable[[], Any], timeout: float = 15.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"events so far: {self.log}"


def queue_rows(client: SyncClient) -> list[tuple[Any, ...]]:
    return client.store.query(
        "SELECT unit, state, attempts, next_at FROM syncunit_queue ORDER BY id"
    )


def idle(client: SyncClient) -> bool:
    s = client.status
    return s.unit is None and not s.queued


def booking(minute: int = 0, doctor_id: int = 1) -> dict[str, Any]:
    return {
        "doctor_id": doctor_id,
        "patient_id": 5,
        "starts_at": f"2030-01-01T10:{minute:02d}:00",
        "ends_at": f"2030-01-01T10:{minute + 1:02d}:00",
        "status": "booked",
        "room": "R1",
        "notes": "",
    }


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def stepped(make_client, net, clock, events) -> SyncClient:
    """A client driven by ``scheduler.step()`` (no worker thread), on a fake clock."""
    c = make_client(transport=net, clock=clock, **events.kwargs())
    c.scheduler.rand = lambda: 0.5  # no jitter: the delay is exactly base * factor**n
    c.catalog()  # fetched once, so every attempt below is exactly one sync request
    return c


# -- 1. queue semantics, with the real worker and a slow network ------------------------------


def test_trigger_returns_at_once_and_a_waiting_unit_is_queued_once(make_client, net, events):
    c = make_client(transport=net, **events.kwargs())
    net.hold()

    assert c.trigger("Login") is True
    assert net.wait_for_requests(1)  # the worker is inside the request, which is held...
    assert events.completed() == []  # ...so trigger did not wait for the sync
    s = c.status
    assert (s.state, s.unit, s.queued) == ("syncing", "Login", [])

    assert c.trigger("Splash") is True
    assert c.trigger("Splash") is False  # already waiting: not queued twice
    assert c.trigger("Login") is True  # the running one is not waiting: a new run is queued
    assert c.trigger("Login") is False
    assert c.status.queued == ["Splash", "Login"]
    assert [r[:2] for r in queue_rows(c)] == [
        ("Login", "running"),
        ("Splash", "pending"),
        ("Login", "pending"),
    ]
    assert net.units == ["Login"]  # nothing else started while the first run is held

    net.release()
    events.wait(lambda: len(events.completed()) == 3)
    wait_until(lambda: idle(c))
    assert events.completed() == ["Login", "Splash", "Login"]
    assert net.units == ["Login", "Splash", "Login"]
    assert queue_rows(c) == []
    assert c.status.state == "idle"


def test_queue_runs_in_fifo_order(make_client, net, events):
    c = make_client(transport=net, **events.kwargs())
    net.hold()
    c.trigger("Splash")
    assert net.wait_for_requests(1)
    for unit in ["SendAppointments", "Login", "Online"]:
        assert c.trigger(unit)
    assert c.status.queued == ["SendAppointments", "Login", "Online"]

    net.release()
    events.wait(lambda: len(events.completed()) == 4)

    assert net.units == ["Splash", "SendAppointments", "Login", "Online"]
    assert [u for (u,) in events.of("start")] == net.units


def test_discard_pending_drops_the_queued_requests_not_the_running_one(make_client, net, events):
    c = make_client(transport=net, **events.kwargs())
    c.catalog()  # what Online does (without it nothing is known to be covered)
    net.hold()
    c.trigger("Login")
    assert net.wait_for_requests(1)
    c.trigger("Splash")
    c.trigger("SendAppointments")

    assert c.trigger("Online", discard_pending=True) is True
    assert c.status.queued == ["Online"]
    assert [r[:2] for r in queue_rows(c)] == [("Login", "running"), ("Online", "pending")]

    net.release()
    events.wait(lambda: len(events.completed()) == 2)
    wait_until(lambda: idle(c))
    assert net.units == ["Login", "Online"]  # Splash and SendAppointments never ran
    assert events.completed() == ["Login", "Online"]  # the running Login was not dropped
    assert c.store.last_sync_on("Splash") is None
    assert len(local_keys(c, "LocalAppointment")) == 200


def test_discard_pending_drops_only_the_runs_the_unit_does(make_client, net):
    """A run is dropped only for one that does it too: Login pulls neither Splash's
    stream nor pushes SendAppointments' table, so both stay; Online does all three."""
    c = make_client(transport=net)
    c.catalog()
    c.set_online(False)  # the worker runs nothing meanwhile
    c.scheduler.enqueue("Splash")
    c.scheduler.enqueue("SendAppointments")

    assert c.trigger("Login", discard_pending=True) is True
    assert c.status.queued == ["Splash", "SendAppointments", "Login"]
    assert c.trigger("Online", discard_pending=True) is True
    assert c.status.queued == ["Online"]
    assert net.units == []


def test_one_sync_at_a_time_an_app_sync_waits_for_the_background_one(make_client, net, events):
    c = make_client(transport=net, **events.kwargs())
    net.hold()
    c.trigger("Login")
    assert net.wait_for_requests(1)

    results = []
    app = threading.Thread(target=lambda: results.append(c.sync("Splash")), name="app")
    app.start()
    events.wait(lambda: ("Splash",) in events.of("start"))  # the app's sync has begun...
    # ...but sends nothing while the background run is in flight (a bounded look).
    assert not net.wait_for_requests(2, timeout=0.5)

    net.release()
    app.join(15)
    assert not app.is_alive()
    assert results[0].unit == "Splash"
    wait_until(lambda: idle(c))
    assert net.units == ["Login", "Splash"]
    assert net.max_in_flight == 1  # never two requests at the same time
    assert events.completed() == ["Login", "Splash"]


def test_never_two_requests_in_flight_with_many_triggers(make_client, net, events):
    c = make_client(transport=net, **events.kwargs())
    units = ["Login", "Splash", "SendAppointments", "Online"]
    threads = [
        threading.Thread(target=c.trigger, args=(units[i % 4],), name=f"app{i}") for i in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    app = threading.Thread(target=c.sync, args=("Login",))
    app.start()
    app.join(30)
    wait_until(lambda: idle(c))

    assert net.max_in_flight == 1
    assert set(net.units) == set(units)
    assert c.status.queued == []


# -- 2. retry and backoff, with an injected clock ---------------------------------------------


def test_network_failure_keeps_the_unit_queued_until_the_backoff_is_over(stepped, net, clock):
    net.fail("offline")
    c = stepped
    assert c.scheduler.enqueue("Login") is True

    assert c.scheduler.step() is True  # it ran, and failed
    assert queue_rows(c) == [("Login", "pending", 1, 1001.0)]  # next_at = now + 1 s
    assert c.status.next_retry_in == pytest.approx(1.0)

    clock.t = 1000.999
    assert c.scheduler.step() is False  # before the delay: nothing
    assert net.units == ["Login"]

    clock.t = 1001.0
    assert c.scheduler.step() is True  # due: retried
    assert net.units == ["Login", "Login"]
    assert queue_rows(c) == [("Login", "pending", 2, 1003.0)]  # then 2 s

    net.heal()
    clock.t = 1003.0
    assert c.scheduler.step() is True
    assert queue_rows(c) == []
    assert len(local_keys(c, "LocalAppointment")) == 200


def test_delays_grow_exponentially_and_are_capped(make_client, net, clock):
    c = make_client(transport=net, clock=clock, retry=RetryPolicy(max_delay=5.0))
    c.scheduler.rand = lambda: 0.5
    c.catalog()
    net.fail("offline")
    c.scheduler.enqueue("Login")

    delays = []
    for _ in range(6):
        assert c.scheduler.step() is True
        (_, _, _, next_at) = queue_rows(c)[0]
        delays.append(next_at - clock())
        clock.t = next_at
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert queue_rows(c)[0][2] == 6
    assert net.units == ["Login"] * 6


@pytest.mark.parametrize(("rand", "expected"), [(0.0, 0.8), (0.25, 0.9), (0.5, 1.0), (0.75, 1.1)])
def test_jitter_follows_rand(stepped, net, clock, rand, expected):
    stepped.scheduler.rand = lambda: rand
    net.fail("offline")
    stepped.scheduler.enqueue("Splash")

    stepped.scheduler.step()

    assert queue_rows(stepped)[0][3] == pytest.approx(clock() + expected)


def test_retry_policy_delay():
    p = RetryPolicy()  # base 1 s, factor 2, cap 60 s, jitter ±20 %
    assert [p.delay(n, 0.5) for n in range(1, 8)] == [1, 2, 4, 8, 16, 32, 60]
    assert p.delay(1, 0.0) == pytest.approx(0.8)
    assert p.delay(3, 1.0) == pytest.approx(4.8)
    assert p.delay(50, 0.5) == 60.0
    assert RetryPolicy(jitter=0).delay(2, 0.9) == 2.0


def test_max_attempts_gives_up_and_reports(make_client, net, clock, events):
    c = make_client(
        transport=net, clock=clock, retry=RetryPolicy(max_attempts=3), **events.kwargs()
    )
    c.scheduler.rand = lambda: 0.5
    c.catalog()
    net.fail("offline")
    c.scheduler.enqueue("Login")

    c.scheduler.step()
    assert len(events.errors()) == 1  # the first network error is reported...
    clock.advance(1)
    c.scheduler.step()
    assert len(events.errors()) == 1  # ...not every retry (offline is a status)...
    clock.advance(2)
    c.scheduler.step()  # the third attempt: give up

    assert queue_rows(c) == []
    errors = events.errors()
    assert len(errors) == 2  # ...but giving up is reported
    assert errors[-1][0] == "Login"
    assert isinstance(errors[-1][1], NetworkError)
    clock.advance(3600)
    assert c.scheduler.step() is False
    assert net.units == ["Login"] * 3


def test_max_attempts_with_server_errors(make_client, net, clock, events):
    c = make_client(
        transport=net, clock=clock, retry=RetryPolicy(max_attempts=2), **events.kwargs()
    )
    c.catalog()
    net.fail(503)
    c.scheduler.enqueue("Splash")

    c.scheduler.step()
    assert [r[:3] for r in queue_rows(c)] == [("Splash", "pending", 1)]
    clock.advance(10)
    c.scheduler.step()

    assert queue_rows(c) == []
    assert [(u, e.status) for u, e in events.errors()] == [("Splash", 503), ("Splash", 503)]
    clock.advance(3600)
    assert c.scheduler.step() is False
    assert net.units == ["Splash", "Splash"]


@pytest.mark.parametrize(
    ("status", "error"), [(401, AuthError), (403, AuthError), (422, RequestRejected)]
)
def test_no_retry_on_client_errors(stepped, net, clock, events, status, error):
    net.fail(status)
    stepped.scheduler.enqueue("Login")

    assert stepped.scheduler.step() is True

    assert queue_rows(stepped) == []  # the unit left the queue
    [(unit, exc)] = events.errors()  # reported once
    assert unit == "Login"
    assert type(exc) is error
    assert exc.status == status
    assert stepped.status.last_error_unit == "Login"
    assert stepped.status.state == "idle"  # not offline, not retrying
    clock.advance(3600)
    assert stepped.scheduler.step() is False
    assert net.units == ["Login"]


def test_real_401_and_422_from_the_server_are_not_retried(make_client, clock, events):
    bad_token = make_client("not-a-token", name="bad", clock=clock, **events.kwargs())
    bad_chunk = make_client(name="chunk", clock=clock, **events.kwargs())
    bad_chunk.chunk_size = 0  # past the constructor's check: the server answers 422
    for c in (bad_token, bad_chunk):
        c.scheduler.enqueue("Login")
        assert c.scheduler.step() is True
        assert queue_rows(c) == []

    [(_, e401), (_, e422)] = events.errors()
    assert isinstance(e401, AuthError)
    assert (e401.status, e401.code) == (401, "unauthenticated")
    assert isinstance(e422, RequestRejected)
    assert (e422.status, e422.code) == (422, "invalid-request")


def test_503_is_retried(stepped, net, clock, events):
    net.fail(503)
    stepped.scheduler.enqueue("Login")

    stepped.scheduler.step()

    assert queue_rows(stepped) == [("Login", "pending", 1, 1001.0)]
    s = stepped.status
    assert s.state == "retrying"
    assert s.online is True
    assert s.next_retry_in == pytest.approx(1.0)
    assert s.last_error_unit == "Login"
    [(_, exc)] = events.errors()
    assert isinstance(exc, ProblemError)
    assert exc.status == 503

    net.heal()
    clock.advance(1)
    assert stepped.scheduler.step() is True
    assert queue_rows(stepped) == []
    assert stepped.status.state == "idle"
    assert events.completed() == ["Login"]


def test_a_clock_stepped_back_brings_the_due_times_back_with_it(stepped, net, clock):
    """A retry set before the clock stepped back (an NTP correction) is due as it was
    meant to be, not hours later; a periodic run too."""
    stepped.scheduler.periodic = ("Splash", 60.0)
    net.fail("offline")
    stepped.scheduler.enqueue("Login")
    stepped.scheduler.step()
    assert queue_rows(stepped) == [("Login", "pending", 1, 1001.0)]
    net.heal()
    clock.advance(-3 * 3600)

    assert stepped.scheduler.step() is False  # due in 1 s, as it was
    assert stepped.status.next_retry_in == pytest.approx(1.0)
    assert stepped.scheduler._wait_time() == pytest.approx(1.0)
    clock.advance(1)
    assert stepped.scheduler.step() is True
    clock.advance(60)
    stepped.scheduler.step()
    assert queue_rows(stepped) == [("Splash", "pending", 0, 0.0)]  # every 60 s, as set


def test_no_due_time_is_further_than_the_longest_wait_asked(stepped, net, clock):
    """A retry set by a clock far ahead, or a server's ``Retry-After`` of years, waits
    at most an hour (``MAX_RETRY_AFTER``), and the worker's wait stays short."""
    net.fail(503, retry_after=10**11)
    stepped.scheduler.enqueue("Login")
    stepped.scheduler.step()
    [(_, _, _, due)] = queue_rows(stepped)
    assert due == clock.t + MAX_RETRY_AFTER
    with stepped.store.atomic() as c:  # as a clock decades ahead had set it
        c.execute("UPDATE syncunit_queue SET next_at = 1e11")
    stepped.scheduler.step()
    assert queue_rows(stepped)[0][3] <= clock.t + MAX_RETRY_AFTER
    assert stepped.scheduler._wait_time() <= MAX_RETRY_AFTER


# -- 3. a failing unit does not block the ones behind it ---------------------------------------


def test_a_local_database_that_is_full_is_retried_like_the_network(stepped, clock, events):
    """A run the device's database could not take (no page more for the rows: SQLite's
    ``SQLITE_FULL``, as on a full disk) fails with a retryable ``LocalStoreError``:
    the unit stays queued for its backoff instead of leaving the queue."""
    c = stepped
    c.scheduler.enqueue("Login")
    (pages,) = c.store.conn.execute("PRAGMA page_count").fetchone()
    c.store.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full

    assert c.scheduler.step() is True

    [(unit, exc)] = events.errors()
    assert unit == "Login"
    assert isinstance(exc, LocalStoreError)
    assert exc.retryable
    assert "database or disk is full" in str(exc)
    assert queue_rows(c) == [("Login", "pending", 1, 1001.0)]
    assert c.status.state == "retrying"

    c.store.conn.execute(f"PRAGMA max_page_count = {2**30}")  # room again
    clock.t = 1001.0
    assert c.scheduler.step() is True
    assert queue_rows(c) == []
    assert len(local_keys(c, "LocalAppointment")) == 200


def test_a_queue_the_worker_cannot_write_is_tried_again_after_a_backoff(
    make_client, events, caplog
):
    """step() itself failing (the queue's own write refused, as by a full disk) makes
    the worker wait the retry policy's delay instead of trying again at once: one
    log record and one ``on_error`` for the run of failures, a status that says so,
    and the unit runs once the queue can be written again."""
    caplog.set_level(logging.INFO, logger="syncunit")
    c = make_client(retry=RetryPolicy(base_delay=0.2, jitter=0.0), **events.kwargs())
    with c.store.lock:  # a write SQLite refuses: moving the unit to running
        c.store.conn.execute(
            "CREATE TEMP TRIGGER refuse BEFORE UPDATE OF state ON syncunit_queue"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full (test)'); END"
        )
    c.trigger("Login")
    events.wait(lambda: events.errors())
    time.sleep(1.0)  # delays of 0.2, 0.4, 0.8 s: three or four attempts

    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage()[:36] for r in failed] == ["the sync worker cannot run its queue"]
    [(unit, exc)] = events.errors()
    assert unit == "Login"
    assert isinstance(exc, LocalStoreError)
    assert "database or disk is full (test)" in str(exc)
    s = c.status
    assert (s.state, s.queued, s.last_error_unit) == ("retrying", ["Login"], "Login")
    assert "database or disk is full (test)" in (s.last_error or "")

    with c.store.lock:
        c.store.conn.execute("DROP TRIGGER temp.refuse")
    events.wait(lambda: events.completed() == ["Login"])
    wait_until(lambda: idle(c))
    assert len(local_keys(c, "LocalAppointment")) == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        failed[0].getMessage()
    ]


def test_a_failing_unit_waits_while_the_one_behind_it_runs(stepped, net, clock, events):
    net.fail("offline", unit="Splash")
    stepped.scheduler.enqueue("Splash")
    stepped.scheduler.enqueue("Login")

    assert stepped.scheduler.step() is True  # Splash fails
    assert stepped.scheduler.step() is True  # Login, behind it, goes ahead
    assert events.completed() == ["Login"]
    assert len(local_keys(stepped, "LocalAppointment")) == 200
    assert stepped.status.queued == ["Splash"]
    assert stepped.scheduler.step() is False  # Splash waits for its retry

    net.heal()
    clock.advance(1)
    assert stepped.scheduler.step() is True
    assert events.completed() == ["Login", "Splash"]
    assert net.units == ["Splash", "Login", "Splash"]
    assert queue_rows(stepped) == []


def test_a_failing_unit_does_not_block_the_worker(make_client, net, events):
    c = make_client(transport=net, **events.kwargs())
    net.fail("offline", unit="Splash")
    c.trigger("Splash")
    c.trigger("Login")

    events.wait(lambda: events.completed() == ["Login"])

    assert len(local_keys(c, "LocalAppointment")) == 200
    assert c.status.queued == ["Splash"]
    assert {u for u, _ in events.errors()} == {"Splash"}


# -- 4. events and status ---------------------------------------------------------------------


def test_events_from_the_worker_thread_with_their_arguments(make_client, events):
    c = make_client(**events.kwargs())
    c.trigger("Login")
    events.wait(lambda: events.completed())

    names = [n for n, _, _ in events.log]
    assert names[0] == "start"
    assert names[-1] == "complete"
    assert set(names[1:-1]) == {"progress"}
    assert {t for _, _, t in events.log} == {"syncunit-worker"}
    assert events.of("start") == [("Login",)]
    progress = events.of("progress")
    assert {u for u, _, _ in progress} == {"Login"}
    dones = [d for _, d, _ in progress]
    assert dones == sorted(dones)
    assert all(d <= t for _, d, t in progress)
    assert progress[-1] == ("Login", 210, 210)  # 10 doctors + 200 appointments
    [(result,)] = events.of("complete")
    assert result.unit == "Login"
    assert result.rows_in == LOGIN_ROWS
    assert result.requests == 1  # the catalog travels inside the first response
    assert events.errors() == []


def test_on_error_from_the_worker_thread(make_client, events):
    c = make_client(**events.kwargs())
    c.chunk_size = 0  # past the constructor's check: the server answers 422
    c.trigger("Login")
    events.wait(lambda: events.errors())

    [(unit, exc)] = events.errors()
    assert unit == "Login"
    assert isinstance(exc, RequestRejected)
    assert [t for n, _, t in events.log if n == "error"] == ["syncunit-worker"]
    assert events.completed() == []
    wait_until(lambda: idle(c))
    assert queue_rows(c) == []


def _raise(*args: Any) -> None:
    raise RuntimeError("a bug in the app's callback")


def test_a_failing_start_or_complete_callback_breaks_neither_sync_nor_worker(make_client):
    done = threading.Event()

    def on_complete(result):
        done.set()
        raise RuntimeError("a bug in the app's callback")

    c = make_client(on_start=_raise, on_complete=on_complete)
    c.trigger("Login")
    assert done.wait(15)
    wait_until(lambda: idle(c))
    assert c.store.last_sync_on("Login") is not None
    assert len(local_keys(c, "LocalAppointment")) == 200
    assert queue_rows(c) == []

    done.clear()
    c.trigger("Splash")  # the worker is still alive
    assert done.wait(15)
    wait_until(lambda: c.store.last_sync_on("Splash"))
    assert c.scheduler.running


def test_a_failing_error_callback_does_not_break_the_worker(make_client, net):
    done = threading.Event()
    c = make_client(transport=net, on_error=_raise, on_complete=lambda r: done.set())
    net.fail(403, unit="Splash")
    c.trigger("Splash")
    c.trigger("Login")

    assert done.wait(15)
    wait_until(lambda: idle(c))
    assert len(local_keys(c, "LocalAppointment")) == 200
    assert c.status.last_error_unit == "Splash"
    assert c.scheduler.running


def test_a_failing_progress_callback_does_not_break_the_sync(make_client):
    c = make_client(on_progress=_raise)

    result = c.sync("Login")

    assert result.rows_in == LOGIN_ROWS
    assert len(local_keys(c, "LocalAppointment")) == 200


def test_status_syncing_then_idle(make_client, net):
    c = make_client(transport=net)
    assert c.status.state == "idle"
    net.hold()
    c.trigger("Login")
    assert net.wait_for_requests(1)

    s = c.status
    assert (s.state, s.unit, s.online) == ("syncing", "Login", True)

    net.release()
    wait_until(lambda: c.status.state == "idle")
    s = c.status
    assert (s.unit, s.queued, s.last_error) == (None, [], None)


def test_status_offline_after_network_errors_with_one_error_event(stepped, net, clock, events):
    net.fail("offline")
    stepped.scheduler.enqueue("Login")

    for _ in range(4):
        assert stepped.scheduler.step() is True
        assert stepped.status.state == "offline"
        clock.advance(60)
    s = stepped.status
    assert s.online is True  # the app did not say so: the engine noticed
    assert s.queued == ["Login"]
    assert "cannot reach the server" in (s.last_error or "")
    assert len(net.units) == 4
    assert [u for u, _ in events.errors()] == ["Login"]  # one error, not one per retry

    net.heal()
    assert stepped.scheduler.step() is True
    assert stepped.status.state == "idle"


def test_status_counts_pending_mutations(stepped, events, store):
    c = stepped
    c.sync("Login")
    k1 = c.insert("LocalAppointment", booking(0))
    k2 = c.insert("LocalAppointment", booking(30))
    c.update("LocalAppointment", k1, {"notes": "changed on the device"})
    assert c.status.pending_mutations == c.outbox.count() >= 2

    c.scheduler.enqueue("SendAppointments")
    assert c.scheduler.step() is True

    assert c.status.pending_mutations == 0
    [(result,)] = [r for r in events.of("complete") if r[0].unit == "SendAppointments"]
    assert result.applied >= 2
    assert result.rejected == []
    assert result.conflicts == []
    assert {k1, k2} <= set(appointments_of(store, 1))
