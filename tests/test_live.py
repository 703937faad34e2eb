"""Live changes: ``POST /v1/live/{unit}`` long-polls, and ``SyncClient.watch`` reacts.

A watching client hears about a change in its unit's scope (another device's
booking, or a plain-SQL write on the server) and syncs it; a write outside its
scope wakes nobody; a server restart is survived by reconnecting with backoff.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from hospital.generate import generate

from syncunit.client import live as client_live
from syncunit.errors import AuthError, NetworkError, RequestRejected
from syncunit.protocol import PROBLEM, content_type
from syncunit.server import Principal
from tests.conftest import SIZE
from tests.support import LiveServer, final_cursors, local_keys, raw_sync, sync_body
from tests.test_scheduler import Events, booking, wait_until

POLL_WAIT = 0.3  # the long-poll's wait in these tests (the default is 20 s)


@pytest.fixture
def short_polls(monkeypatch) -> None:
    """``client.watch()`` makes watchers whose long-polls last ``POLL_WAIT`` seconds."""
    defaults = dict(client_live.LiveWatcher.__init__.__kwdefaults__)
    defaults["wait"] = POLL_WAIT
    monkeypatch.setattr(client_live.LiveWatcher.__init__, "__kwdefaults__", defaults)


def insert_appointment(plain_sql, doctor_id: int, hour: int = 9) -> str:
    """A booking written with plain SQL on the server database, as a backoffice would."""
    key = str(uuid.uuid4())
    start = dt.datetime(2031, 3, 1, hour, 0)
    plain_sql(
        "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status, room,"
        " notes) VALUES (:id, :doctor, 7, :s, :e, 'booked', 'R2', 'from the backoffice')",
        {
            "id": key,
            "doctor": doctor_id,
            "s": start.isoformat(" "),
            "e": (start + dt.timedelta(minutes=15)).isoformat(" "),
        },
    )
    return key


def watching(make_client, name: str = "b", **options: Any):
    """A client with Login synced and watched, and the events it fires."""
    events = Events()
    c = make_client(name=name, **events.kwargs(), **options)
    c.sync("Login")
    events.log.clear()
    c.watch("Login")
    wait_until(lambda: c._live.polls >= 1)
    return c, events


# -- the client watching ------------------------------------------------------------------------


def test_another_devices_booking_reaches_a_watching_client(make_client, short_polls, in_sync):
    a = make_client(name="a")
    a.sync("Login")
    b, events = watching(make_client)

    key = a.insert("LocalAppointment", booking(15))
    assert a.trigger("SendAppointments")

    wait_until(lambda: key in local_keys(b, "LocalAppointment"))
    wait_until(lambda: "Login" in events.completed())  # the row lands before the sync returns
    assert b._live.changes >= 1
    assert {t for n, _, t in events.log if n == "complete"} == {"syncunit-worker"}
    wait_until(lambda: not b.status.queued and b.status.unit is None)
    in_sync(b)


def test_a_plain_sql_write_in_scope_reaches_the_watching_client(
    make_client, short_polls, plain_sql, in_sync
):
    b, _ = watching(make_client)

    key = insert_appointment(plain_sql, doctor_id=1)

    wait_until(lambda: key in local_keys(b, "LocalAppointment"))
    [(notes, doctor_name)] = b.store.query(
        "SELECT notes, doctor_name FROM LocalAppointment WHERE id = ?", (key,)
    )
    assert notes == "from the backoffice"
    assert doctor_name  # denormalized on the way, like every other row
    wait_until(lambda: not b.status.queued and b.status.unit is None)
    in_sync(b)


def test_a_write_outside_the_scope_wakes_nobody(make_client, short_polls, plain_sql, store):
    b, events = watching(make_client)
    keys_before = local_keys(b, "LocalAppointment")

    insert_appointment(plain_sql, doctor_id=2)  # doctor 2 works at hospital 2
    polls = b._live.polls
    wait_until(lambda: b._live.polls >= polls + 3)  # polls that saw the write came and went

    assert b._live.changes == 0
    assert events.of("start") == []  # no sync that would bring nothing
    assert b._live.errors == 0
    assert local_keys(b, "LocalAppointment") == keys_before

    key = insert_appointment(plain_sql, doctor_id=3)  # hospital 1: this one is for b
    wait_until(lambda: key in local_keys(b, "LocalAppointment"))
    assert b._live.changes == 1


def test_the_watcher_waits_for_a_sync_that_leaves_the_queue_while_it_looks(make_client):
    """The worker moving the unit from queued to running between the watcher's two
    looks must not read as "done": the next poll would send the old cursors and hear
    of the same change again."""
    c = make_client(name="settle")
    scheduler = c.scheduler
    scheduler.enqueue("Login")
    queued = scheduler.queued

    def worker_picks_it_up_meanwhile() -> list[str]:
        def step() -> None:  # what Scheduler.step does, under the store's lock
            with c.store.atomic() as conn:
                scheduler.current = "Login"
                conn.execute("UPDATE syncunit_queue SET state = 'running' WHERE unit = 'Login'")

        worker = threading.Thread(target=step)
        worker.start()
        worker.join(0.3)  # blocks for as long as the watcher holds the lock
        return queued()

    scheduler.queued = worker_picks_it_up_meanwhile  # type: ignore[method-assign]
    watcher = client_live.LiveWatcher(c, "Login", lambda unit: None)
    settling = threading.Thread(target=watcher._settle)
    settling.start()
    settling.join(1.0)
    try:
        assert settling.is_alive()  # still waiting: the unit is running
    finally:
        watcher._stop.set()
        settling.join(5)
        scheduler.current = None


def test_watch_with_a_callback_instead_of_a_sync(make_client, short_polls, plain_sql):
    heard = threading.Event()
    units: list[str] = []
    events = Events()
    b = make_client(name="b", **events.kwargs())
    b.sync("Login")
    events.log.clear()

    b.watch("Login", on_change=lambda unit: (units.append(unit), heard.set()))
    insert_appointment(plain_sql, doctor_id=1)

    assert heard.wait(15)
    assert units[0] == "Login"
    assert events.of("start") == []  # the app decides; nothing was triggered


@pytest.fixture
def port_servers():
    started: list[LiveServer] = []
    yield started
    for s in started:
        if s.thread.is_alive():
            s.stop()


@pytest.mark.parametrize("same_app", [True, False], ids=["same-app", "new-process"])
def test_the_watcher_reconnects_after_a_server_restart(
    server, make_server, make_client, short_polls, plain_sql, port_servers, same_app
):
    first = LiveServer(server.app, 0)
    port_servers.append(first)
    b, events = watching(make_client, url=first.url)

    first.stop()  # the server goes away (the open long-poll connection is closed)
    wait_until(lambda: b._live.errors >= 1)

    # It comes back on the same port: the same app object, or a fresh server (a new process).
    app = server.app if same_app else make_server(install=False).app
    second = LiveServer(app, first.port)
    port_servers.append(second)
    key = insert_appointment(plain_sql, doctor_id=1)

    wait_until(lambda: key in local_keys(b, "LocalAppointment"))
    wait_until(lambda: bool(events.completed()))  # the row lands before the sync returns
    assert b._live.changes >= 1
    assert b._live.errors >= 1
    assert events.completed()[-1] == "Login"
    # ...and the restarted server's long-polls wait as they should.
    r = _live(second.url, "Login", _up_to_date_body(second.url), wait=0.2)
    assert r.status_code == 200, r.text
    assert r.json() == {"unit": "Login", "changed": False}


class RecordingStop(threading.Event):
    """The watcher's stop event, recording each pause it asks for (and pausing briefly)."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.pauses.append(timeout or 0.0)
        return super().wait(0.005)


def test_the_watcher_backs_off_exponentially_and_recovers(make_client, short_polls, plain_sql):
    b, _ = watching(make_client)
    stop = RecordingStop()
    b._live._stop = stop
    down = threading.Event()
    send = b._send

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        if down.is_set():
            raise NetworkError("cannot reach the server: connection refused (test)")
        return send(*args, **kwargs)

    b._send = unreachable  # type: ignore[method-assign]
    down.set()  # every poll now fails to reach the server

    wait_until(lambda: len(stop.pauses) >= 9)
    assert stop.pauses[:9] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert b._live.changes == 0
    assert b._live._thread.is_alive()

    down.clear()  # it works again: the watcher recovers
    key = insert_appointment(plain_sql, doctor_id=1)
    wait_until(lambda: key in local_keys(b, "LocalAppointment"))

    polls = b._live.polls
    wait_until(lambda: b._live.polls >= polls + 2)  # done with that change: plain polls again

    n, errors = len(stop.pauses), b._live.errors
    down.set()
    # The watcher counts an error before it pauses: wait for the pauses themselves.
    wait_until(lambda: len(stop.pauses) >= n + 2)
    assert b._live.errors >= errors + 2
    assert stop.pauses[n : n + 2] == [0.5, 1.0]  # a success reset the backoff


def test_a_refused_token_is_reported_once_and_the_watcher_goes_on(
    make_client, short_polls, plain_sql
):
    """Refused (an expired token, a provider that failed once): told once, polled on,
    and the changes come again once the token is good."""
    errors: list[tuple[str, Exception]] = []
    b, _ = watching(make_client)
    b.on_error = lambda unit, exc: errors.append((unit, exc))
    b.http.headers["Authorization"] = "Bearer not-a-token"  # every poll now answers 401
    wait_until(lambda: b._live.errors >= 2)
    [(unit, exc)] = errors  # one streak of failures: told once
    assert unit == "Login"
    assert isinstance(exc, AuthError)
    assert b.status.last_error == str(exc)

    b.http.headers["Authorization"] = "Bearer token-h1"
    key = insert_appointment(plain_sql, doctor_id=1)
    wait_until(lambda: key in local_keys(b, "LocalAppointment"))
    assert b._live._thread.is_alive()


def test_a_watcher_asks_the_token_provider_for_its_credentials(make_client, short_polls, plain_sql):
    first = make_client(name="b")
    first.sync("Login")
    first.close()  # the device is reopened with a token provider; nothing has synced since
    asked: list[str] = []

    def provider() -> str:
        asked.append("token-h1")
        return "token-h1"

    b = make_client(token=provider, name="b")
    b.watch("Login")
    wait_until(lambda: b._live.polls >= 2)

    assert asked  # the first poll already carried the provider's token
    assert b._live.errors == 0
    key = insert_appointment(plain_sql, doctor_id=1)
    wait_until(lambda: key in local_keys(b, "LocalAppointment"))


def test_a_watcher_asks_the_token_provider_again_when_its_token_expires(
    make_client, short_polls, plain_sql
):
    asked: list[str] = []

    def provider() -> str:
        asked.append("token-h1")
        return "token-h1"

    b, _ = watching(make_client, token=provider)
    n = len(asked)
    polls = b._live.polls
    b.http.headers["Authorization"] = "Bearer expired"  # the token held has expired
    wait_until(lambda: b._live.polls >= polls + 2)  # a poll sent since then has ended

    key = insert_appointment(plain_sql, doctor_id=1)

    wait_until(lambda: key in local_keys(b, "LocalAppointment"))
    assert len(asked) > n  # the watcher's 401 asked the provider for a new token
    polls = b._live.polls
    wait_until(lambda: b._live.polls >= polls + 2)
    assert b.http.headers["Authorization"] == "Bearer token-h1"


def test_watch_of_a_unit_with_client_parameters_is_refused_at_once(make_client):
    """A poll carries no parameter values: the server would refuse every one (400)."""
    b = make_client(name="b")
    b.sync("Login")  # the catalog is known: PatientDetails takes patient_id

    with pytest.raises(RequestRejected, match="patient_id") as info:
        b.watch("PatientDetails")

    assert (info.value.status, info.value.code) == (400, "invalid-parameter")
    assert b._live is None  # nothing polls
    assert "PatientDetails" not in b.refresh_subscriptions_with


def test_a_watcher_refused_its_units_parameters_stops_and_tells_once(make_client, short_polls):
    """Without a catalog yet, the first poll finds out: asking again cannot help."""
    events = Events()
    b = make_client(name="b", **events.kwargs())

    b.watch("PatientDetails")

    events.wait(lambda: events.errors())
    b._live._thread.join(5)
    assert not b._live._thread.is_alive()
    assert b._live.polls == 1
    [(unit, exc)] = events.errors()
    assert unit == "PatientDetails"
    assert isinstance(exc, RequestRejected)
    assert (exc.code, exc.extra.get("subscription")) == ("invalid-parameter", None)
    assert b.status.last_error == str(exc)


# -- the endpoint -------------------------------------------------------------------------------


def _live(url: str, unit: str, body: bytes, *, token: str = "token-h1", wait: Any = 0.5):
    with httpx.Client(base_url=url, timeout=30) as http:
        return http.post(
            f"/v1/live/{unit}",
            params={"wait": str(wait)},
            content=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": content_type("msgpack"),
            },
        )


def _up_to_date_body(url: str) -> bytes:
    return sync_body(cursors=final_cursors(raw_sync(url, "Login", token="token-h1")))


def test_endpoint_up_to_date_cursors_wait_then_answer_unchanged(live):
    body = _up_to_date_body(live.url)

    started = time.monotonic()
    r = _live(live.url, "Login", body, wait=0.5)
    waited = time.monotonic() - started

    assert r.status_code == 200, r.text
    assert r.json() == {"unit": "Login", "changed": False}
    assert waited >= 0.45  # it held the request for the wait (a lower bound only)


def test_endpoint_stale_cursors_answer_changed_at_once(live, plain_sql):
    body = _up_to_date_body(live.url)
    insert_appointment(plain_sql, doctor_id=1)

    r = _live(live.url, "Login", body, wait=60)  # it would time out if it waited

    assert r.status_code == 200
    assert r.json() == {"unit": "Login", "changed": True}
    assert _live(live.url, "Login", sync_body(), wait=60).json()["changed"] is True


def test_endpoint_wakes_a_waiting_client_when_a_change_lands(server, live, plain_sql):
    body = _up_to_date_body(live.url)
    answer: list[httpx.Response] = []
    poll = threading.Thread(target=lambda: answer.append(_live(live.url, "Login", body, wait=60)))
    poll.start()
    try:
        wait_until(lambda: server.monitor.waiters == 1)  # the request is waiting
        insert_appointment(plain_sql, doctor_id=1)
    finally:
        poll.join(30)
    assert not poll.is_alive()
    assert answer[0].json() == {"unit": "Login", "changed": True}


def test_a_long_poll_answers_only_whom_its_request_still_authenticates_as(server, live, plain_sql):
    """A wait outlives the check made when it began: a token revoked (or expired) during
    the wait gets 401 when the change lands, not "changed"; a token that now stands for
    another principal is told to sync, which sees that principal's scope."""
    body = _up_to_date_body(live.url)
    own = server.authenticate
    who: dict[str, Any] = {}

    def authenticate(request: Any) -> Any:
        return who["now"] if "now" in who else own(request)

    server.authenticate = authenticate
    # moved, and nothing changes until the wait ends; revoked, then a change in scope lands
    for now, change, status, answer in [
        (Principal("moved", {"hospital_id": 2}), False, 200, True),
        (None, True, 401, "unauthenticated"),
    ]:
        who.clear()
        answers: list[httpx.Response] = []
        wait = 30 if change else 1

        def poll_once(wait: float = wait, answers: list[httpx.Response] = answers) -> None:
            answers.append(_live(live.url, "Login", body, wait=wait))

        poll = threading.Thread(target=poll_once)
        poll.start()
        try:
            wait_until(lambda: server.monitor.waiters == 1)  # it authenticated, and waits
            who["now"] = now
            if change:
                insert_appointment(plain_sql, doctor_id=1)
        finally:
            poll.join(40)
        assert answers[0].status_code == status, answers[0].text
        got = answers[0].json()
        assert (got["code"] if status == 401 else got["changed"]) == answer
        if status == 401:
            assert "during the wait" in got["detail"]


@pytest.mark.parametrize(
    ("unit", "token", "wait", "status", "code"),
    [
        ("Nope", "token-h1", 0.5, 404, "unknown-unit"),
        ("Login", "not-a-token", 0.5, 401, "unauthenticated"),
        ("Login", "token-h1", "soon", 422, "invalid-request"),
    ],
)
def test_endpoint_problems(live, unit, token, wait, status, code):
    r = _live(live.url, unit, sync_body(), token=token, wait=wait)

    assert r.status_code == status
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == code


def test_an_idle_long_poll_checks_its_scope_only_when_a_version_moves(server, live, monkeypatch):
    """Looking whether its client is still there is not a reason to read the scope again:
    a wait on a quiet database checks it once."""
    body = _up_to_date_body(live.url)
    checks: list[str] = []
    has_changes = server._has_changes
    monkeypatch.setattr(server, "_has_changes", lambda *a: checks.append("x") or has_changes(*a))

    r = _live(live.url, "Login", body, wait=5)

    assert r.json() == {"unit": "Login", "changed": False}
    assert checks == ["x"]


def test_a_long_poll_whose_client_left_gives_its_share_back(make_server, serve, store):
    """A client gone mid-wait (an app closed, a network lost) holds its principal's share
    of long waits only until the server looks again, not until the wait ends."""
    server = make_server(max_live_waiters=6, live_waiters_per_principal=1)
    generate(store.engine, **SIZE)
    live = serve(server.app)
    body = _up_to_date_body(live.url)
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
    sock.sendall(
        b"POST /v1/live/Login?wait=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer token-h1\r\nContent-Type: " + content_type("msgpack").encode()
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    wait_until(lambda: server.live_waits.used == 1)
    assert _live(live.url, "Login", body, wait=0).status_code == 503  # its one share

    sock.close()  # gone, 58 s before its wait ends

    wait_until(lambda: server.live_waits.used == 0, timeout=10)
    assert _live(live.url, "Login", body, wait=0).status_code == 200


def test_one_principal_cannot_take_every_long_poll(make_server, serve, store, plain_sql):
    """Long-polls waiting are bounded per principal too: one principal (a stolen token)
    filling its share is told to retry later, and other principals still wait."""
    server = make_server(max_live_waiters=6, live_waiters_per_principal=2)
    generate(store.engine, **SIZE)
    live = serve(server.app)
    mine = _up_to_date_body(live.url)
    theirs = sync_body(cursors=final_cursors(raw_sync(live.url, "Login", token="token-h2")))
    answers: list[httpx.Response] = []
    polls = [
        threading.Thread(target=lambda: answers.append(_live(live.url, "Login", mine, wait=30)))
        for _ in range(2)
    ]
    for poll in polls:
        poll.start()
    try:
        wait_until(lambda: server.monitor.waiters == 2)
        over = _live(live.url, "Login", mine, wait=30)
        assert over.status_code == 503
        assert over.json()["code"] == "busy"
        assert "this principal" in over.json()["detail"]
        assert int(over.headers["Retry-After"]) >= 1
        other = _live(live.url, "Login", theirs, token="token-h2", wait=0.2)  # another principal
        assert other.status_code == 200, other.text
        assert other.json() == {"unit": "Login", "changed": False}
    finally:
        insert_appointment(plain_sql, doctor_id=1)  # hospital 1's polls answer now
        for poll in polls:
            poll.join(30)
    assert [a.json()["changed"] for a in answers] == [True, True]
    assert _live(live.url, "Login", mine, wait=0).status_code == 200  # its waits are back


def test_the_version_monitor_outlives_a_failed_read(server, plain_sql, caplog):
    """A read of the version that fails (a database restart) is logged in one line,
    and the waiters are still woken by the next change, without a task dying."""
    import asyncio

    import sqlalchemy as sa

    from syncunit.server.live import VersionMonitor

    store = server.store
    monitor = VersionMonitor(store, interval=0.05)
    real = store.current_version
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) <= 2:
            raise sa.exc.OperationalError("SELECT version", {}, OSError("server closed"))
        return real()

    store.current_version = flaky  # type: ignore[method-assign]
    seen = real()

    async def wait() -> int:
        waiting = asyncio.create_task(monitor.wait_beyond(seen, 20.0))
        await asyncio.sleep(0.3)
        assert monitor._task is not None
        assert not monitor._task.done()
        plain_sql("UPDATE doctor SET name = name || '.' WHERE id = 1")
        return await waiting

    try:
        assert asyncio.run(wait()) > seen
    finally:
        store.current_version = real  # type: ignore[method-assign]
    failed = [r for r in caplog.records if "reading the version failed" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].exc_info is None
