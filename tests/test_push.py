"""Pushing: exactly once, in order, validated, authorized, under business rules.

DESIGN section 4 (push) and invariants 2 (no lost write), 3 (exactly once) and
5 (scope). Exactly-once tests count real applications on the server: the
notes schema's ``audit`` rule writes one row each time a change is applied.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from hospital.models import appointment

from syncunit.errors import AuthError, NetworkError, ProblemError
from syncunit.policies import LastWriteWins, MutationContext
from syncunit.protocol import (
    PROBLEM,
    PROTOCOL_VERSION,
    Answered,
    Chunk,
    Mutation,
    PushResults,
    SyncRequest,
)
from syncunit.server import Principal, SyncServer, TokenAuth
from syncunit.server import push as push_module
from syncunit.server.problems import ProblemException
from syncunit.server.push import PushApplier
from syncunit.units import Stream, SyncSchema, SyncUnit
from tests.support import appointments_of, doctors_of, local_keys
from tests.test_push_support import (
    TOKENS,
    FaultTransport,
    frames_of,
    local_notes,
    post_sync,
    push_results,
)

SLOT = {
    "patient_id": 5,
    "starts_at": "2031-03-03T10:00:00",
    "ends_at": "2031-03-03T10:15:00",
    "status": "booked",
    "room": "R1",
    "notes": "",
}


def _note(seq: int, key: str, mid: str | None = None, **values: Any) -> Mutation:
    """A raw insert mutation of the notes schema."""
    row = {"id": key, "owner": "u1", "title": key, "body": "", "tag": None, "n": seq, **values}
    return Mutation(
        seq=seq, id=mid or f"m{seq}", table="LocalNote", key=key, op="insert", values=row
    )


def _appointments(store: Any) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(sa.select(appointment)))


def _server_appointment(store: Any, key: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(appointment).where(appointment.c.id == key)).mappings().first()
    return None if row is None else dict(row)


# -- exactly once ----------------------------------------------------------------------------------


def test_lost_response_is_retried_by_the_next_sync_and_applied_once(notes_app):
    app = notes_app(policy=LastWriteWins())
    app.add("b", title="before")
    fault = FaultTransport()
    device = app.client(transport=fault)
    device.sync("Sync")
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "new"})
    device.update("LocalNote", "b", {"title": "after"})

    fault.lose_next()
    with pytest.raises(NetworkError):
        device.sync("Sync")

    # The server applied both; the device does not know yet: both stay in flight.
    assert (app.applications("a"), app.applications("b")) == (1, 1)
    assert app.last_seq(device.client_id) == 2
    versions = (app.version("a"), app.version("b"))
    assert [(p.key, p.seq) for p in device.outbox.pending()] == [("a", 1), ("b", 2)]

    result = device.sync("Sync")

    assert result.applied == 2
    # The same mutations went out again (same seqs, same ids, same payloads) ...
    assert fault.sent[-1].mutations == fault.sent[-2].mutations
    # ... and the server answered from its log instead of applying them again.
    assert (app.applications("a"), app.applications("b")) == (1, 1)
    assert (app.version("a"), app.version("b")) == versions
    assert app.logged(device.client_id) == [(m.seq, m.id) for m in fault.sent[-1].mutations]
    assert device.outbox.pending() == []
    assert local_notes(device) == app.rows("u1")


def _device_with_new_notes(notes_app: Any, *keys: str) -> tuple[Any, FaultTransport, Any]:
    """The notes app, a device on a ``FaultTransport`` after its first sync, and a new
    note for each of ``keys`` in its outbox."""
    app = notes_app()
    fault = FaultTransport()
    device = app.client(transport=fault)
    device.sync("Sync")
    for key in keys:
        device.insert("LocalNote", {"id": key, "owner": "u1", "title": key})
    return app, fault, device


@pytest.mark.parametrize("handled", [False, True], ids=["before", "after"])
def test_a_request_the_server_hung_up_on_is_sent_again_at_once_and_applied_once(notes_app, handled):
    """A server closing a kept-alive connection as the request goes out: the client
    sends it again within the same sync, and it applies once."""
    app, fault, device = _device_with_new_notes(notes_app, "a", "b")

    fault.hang_up_next(handled=handled)
    result = device.sync("Sync")

    assert result.applied == 2
    # The first sync, then this one's request: once if it never arrived, twice (the
    # same mutations, same seqs) if the server had handled it.
    assert len(fault.sent) == (3 if handled else 2)
    assert [m.key for m in fault.sent[-1].mutations] == ["a", "b"]
    if handled:
        assert fault.sent[-1] == fault.sent[-2]
    assert (app.applications("a"), app.applications("b")) == (1, 1)
    assert device.outbox.pending() == []
    assert local_notes(device) == app.rows("u1")


def test_a_second_hang_up_is_a_network_error_and_the_changes_wait_for_the_next_sync(notes_app):
    app, fault, device = _device_with_new_notes(notes_app, "a")

    fault.hang_up_next(handled=True)
    fault.hang_up_next(handled=False)
    with pytest.raises(NetworkError, match="Server disconnected"):
        device.sync("Sync")

    assert len(fault.sent) == 2  # sent again once, not in a loop
    assert [p.key for p in device.outbox.pending()] == ["a"]
    assert device.sync("Sync").applied == 1
    assert app.applications("a") == 1
    assert local_notes(device) == app.rows("u1")


def test_duplicated_request_is_applied_once(notes_app):
    app, fault, device = _device_with_new_notes(notes_app, "a", "b", "c")

    fault.duplicate_next()
    result = device.sync("Sync")

    assert len(fault.sent) == 3  # the empty first sync, then the same request twice
    assert fault.sent[1] == fault.sent[2]
    assert result.applied == 3
    assert app.applications() == 3
    assert device.outbox.pending() == []
    assert local_notes(device) == app.rows("u1")


def test_same_body_posted_twice_returns_the_same_results_and_applies_once(notes_app):
    app = notes_app()
    app.add("x", title="server")
    mutations = [
        _note(1, "a"),
        _note(2, "b"),
        Mutation(seq=3, id="m3", table="LocalNote", key="x", op="update",
                 values={"title": "changed"}, changed=["title"], base={"title": "server"}),
        Mutation(seq=4, id="m4", table="LocalNote", key="a", op="update",
                 values={"owner": "u2"}, changed=["owner"]),  # would leave the scope: rejected
    ]  # fmt: skip

    first = push_results(
        post_sync(app.url, "Push", token="t1", client_id="raw", mutations=mutations)
    )
    state = (app.rows("u1"), app.applications(), app.version("x"))
    second = push_results(
        post_sync(app.url, "Push", token="t1", client_id="raw", mutations=mutations)
    )

    assert [r.status for r in first.results] == ["applied", "applied", "applied", "rejected"]
    assert first.results[3].code == "out-of-scope"
    assert second == first
    assert second.last_seq == 4
    assert (app.rows("u1"), app.applications(), app.version("x")) == state
    assert app.applications() == 3  # a, b, x once each (the rejected one was rolled back)


def test_a_pull_while_applied_changes_wait_for_their_answer_still_brings_their_rows(
    notes_app,
):
    """The server applied a push whose answer was lost; a pull then brings the rows it
    wrote (server defaults filled in) while the device still holds those changes in
    flight. The pull's answer starts with the server's verdicts on them, from its log,
    so the device records them and keeps the rows: the pulls after it would not bring
    them again (their versions are behind the cursor)."""
    app = notes_app()
    fault = FaultTransport()
    device = app.client(transport=fault)
    device.sync("Sync")
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "new"})  # no body, no n
    fault.lose_next()
    with pytest.raises(NetworkError):
        device.sync("Push")
    assert app.applications("a") == 1
    assert [p.key for p in device.outbox.pending()] == ["a"]  # in flight, unanswered

    device.sync("Pull")

    assert fault.sent[-1].unanswered_from == 1
    assert device.outbox.pending() == []  # answered by the pull's verdicts
    assert local_notes(device) == app.rows("u1")  # with the server's body and n
    device.sync("Sync")
    assert local_notes(device) == app.rows("u1")
    assert app.applications("a") == 1


def test_a_pull_answers_only_the_principals_own_client_with_verdicts(notes_app):
    app = notes_app()
    pushed = post_sync(
        app.url, "Push", token="t1", client_id="raw", mutations=[_note(1, "a"), _note(2, "b")]
    )
    assert push_results(pushed).last_seq == 2

    mine = frames_of(post_sync(app.url, "Pull", token="t1", client_id="raw", unanswered_from=2))
    theirs = frames_of(post_sync(app.url, "Pull", token="t2", client_id="raw", unanswered_from=1))
    none = frames_of(post_sync(app.url, "Pull", token="t1", client_id="raw"))

    answered = [f for f in mine if isinstance(f, Answered)]
    assert [(r.seq, r.id, r.status) for a in answered for r in a.results] == [(2, "m2", "applied")]
    assert answered[0].last_seq == 2
    assert mine.index(answered[0]) < min(i for i, f in enumerate(mine) if isinstance(f, Chunk))
    assert not any(isinstance(f, Answered) for f in theirs)  # another principal's client
    assert not any(isinstance(f, Answered) for f in none)  # nothing in flight


def test_a_push_held_for_its_predecessor_sees_it_applied_by_another_server_process(
    notes_app, monkeypatch
):
    """The predecessor goes through another applier (as on another server process),
    which cannot wake this one: the held push finds it by looking again."""
    app = notes_app()
    here = app.server.pusher
    elsewhere = PushApplier(here.store, app.schema, here.limits)
    unit = app.schema.units["Push"]
    principal = TOKENS["t1"]

    def request(*notes: Mutation) -> SyncRequest:
        return SyncRequest(protocol=PROTOCOL_VERSION, client_id="raw", mutations=list(notes))

    looking = threading.Event()  # the later push was refused for a gap and now looks
    wait_for_predecessor = here._wait_for_predecessor

    def spied(*args: Any) -> bool:
        looking.set()
        return wait_for_predecessor(*args)

    monkeypatch.setattr(here, "_wait_for_predecessor", spied)
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(here.apply, principal, request(_note(3, "c"), _note(4, "d")), unit)
        assert looking.wait(30)  # held: its predecessor must come after it
        assert not later.done()
        earlier = elsewhere.apply(principal, request(_note(1, "a"), _note(2, "b")), unit)
        # Found by looking again, well before its wait (2 s) would end.
        answered = later.result(timeout=1.0)

    assert (earlier.last_seq, answered.last_seq) == (2, 4)
    assert app.version("b") < app.version("c")
    assert app.applications() == 4


def test_a_push_held_for_its_predecessor_looks_for_it_without_taking_the_write_lock(
    notes_app, monkeypatch
):
    """A held push reads the client's last seq while it waits, and tries again (a write
    transaction: on SQLite, the lock every push waits for) only once its predecessor
    is in. Other devices' pushes wake it meanwhile; so does a timer, every 20 ms."""
    monkeypatch.setattr(push_module, "PREDECESSOR_WAIT_S", 0.6)
    app = notes_app()
    pusher = app.server.pusher
    unit = app.schema.units["Push"]
    tries: list[tuple[str, int]] = []
    real = pusher._attempts

    def counted(principal: Principal, req: SyncRequest, unit: Any) -> Any:
        tries.append((req.client_id, req.mutations[0].seq))
        return real(principal, req, unit)

    monkeypatch.setattr(pusher, "_attempts", counted)
    looking = threading.Event()  # a push was refused for a gap and now waits (looks)
    wait_for_predecessor = pusher._wait_for_predecessor

    def spied(*args: Any) -> bool:
        looking.set()
        return wait_for_predecessor(*args)

    monkeypatch.setattr(pusher, "_wait_for_predecessor", spied)

    def push(client_id: str, *notes: Mutation) -> Any:
        req = SyncRequest(protocol=PROTOCOL_VERSION, client_id=client_id, mutations=list(notes))
        return pusher.apply(TOKENS["t1"], req, unit)

    def busy() -> None:  # another device pushes all along
        for seq in range(1, 11):
            push("busy", _note(seq, f"busy-{seq}"))
            time.sleep(0.04)

    with ThreadPoolExecutor(2) as pool:
        others = pool.submit(busy)
        with pytest.raises(ProblemException) as gap:
            push("raw", _note(2, "b"))  # seq 1 never comes
        others.result()
    assert gap.value.code == "sequence-gap"
    assert tries.count(("raw", 2)) == 1  # tried once, then only looked
    assert tries.count(("busy", 10)) == 1  # the other device pushed meanwhile

    monkeypatch.setattr(push_module, "PREDECESSOR_WAIT_S", 30.0)  # it must not give up
    looking.clear()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(push, "raw", _note(2, "b"))
        assert looking.wait(30)  # its first try was refused: seq 1 must come after it
        push("raw", _note(1, "a"))
        assert held.result(timeout=30).last_seq == 2
    assert tries.count(("raw", 2)) == 1 + 2  # its first try, and one once seq 1 was in
    assert [r[0] for r in app.rows("u1") if r[0] in ("a", "b")] == ["a", "b"]


def test_reordered_request_is_refused_with_sequence_gap_and_nothing_applied(notes_app, monkeypatch):
    monkeypatch.setattr(push_module, "PREDECESSOR_WAIT_S", 0.2)  # what it waits for never comes
    app = notes_app()
    ok = post_sync(app.url, "Push", token="t1", client_id="raw", mutations=[_note(1, "a")])
    assert push_results(ok).last_seq == 1

    early = [_note(6, "f"), _note(7, "g")]  # 2..5 are still on their way
    refused = post_sync(app.url, "Push", token="t1", client_id="raw", mutations=early)

    assert refused.status_code == 409
    assert refused.headers["content-type"].startswith(PROBLEM)
    problem = refused.json()
    assert problem["code"] == "sequence-gap"
    assert "1" in problem["detail"]
    assert "6" in problem["detail"]
    assert [r[0] for r in app.rows("u1")] == ["a"]
    assert app.applications() == 1
    assert app.last_seq("raw") == 1

    missing = [_note(seq, key) for seq, key in [(2, "b"), (3, "c"), (4, "d"), (5, "e")]]
    assert (
        push_results(
            post_sync(app.url, "Push", token="t1", client_id="raw", mutations=missing)
        ).last_seq
        == 5
    )
    after = push_results(post_sync(app.url, "Push", token="t1", client_id="raw", mutations=early))
    assert [r.status for r in after.results] == ["applied", "applied"]
    assert [r[0] for r in app.rows("u1")] == ["a", "b", "c", "d", "e", "f", "g"]
    assert app.applications() == 7


def test_a_push_that_arrives_before_the_one_it_follows_waits_for_it(notes_app):
    """A client may send its next batch before the answer to this one (two requests in
    flight): the server holds the later one until the one before it is applied, then
    applies it, in order, instead of refusing the gap."""
    app = notes_app()
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(
            post_sync,
            app.url,
            "Push",
            token="t1",
            client_id="raw",
            mutations=[_note(3, "c"), _note(4, "d")],
        )
        time.sleep(0.3)
        assert not later.done()  # held: seqs 1 and 2 have not come yet
        earlier = post_sync(
            app.url, "Push", token="t1", client_id="raw", mutations=[_note(1, "a"), _note(2, "b")]
        )
        answered = later.result()

    assert push_results(earlier).last_seq == 2
    assert push_results(answered).last_seq == 4
    assert [r.status for r in push_results(answered).results] == ["applied", "applied"]
    # Applied after the request before it (one transaction each; PostgreSQL stamps the
    # rows of a transaction alike).
    assert app.version("a") <= app.version("b") < app.version("c") <= app.version("d")
    assert app.applications() == 4
    assert app.last_seq("raw") == 4


def test_a_gap_inside_one_request_is_refused(notes_app):
    app = notes_app()
    r = post_sync(
        app.url, "Push", token="t1", client_id="raw", mutations=[_note(1, "a"), _note(3, "c")]
    )
    assert r.status_code == 422
    assert r.json()["code"] == "invalid-request"
    assert app.rows("u1") == []
    assert app.last_seq("raw") is None


def test_a_seq_reused_by_another_mutation_is_rejected_not_applied(notes_app):
    app = notes_app()
    post_sync(app.url, "Push", token="t1", client_id="raw", mutations=[_note(1, "a")])

    reused = _note(1, "z", mid="another-mutation")
    r = push_results(post_sync(app.url, "Push", token="t1", client_id="raw", mutations=[reused]))

    [res] = r.results
    assert (res.status, res.code, res.id) == ("rejected", "sequence-reused", "another-mutation")
    assert "1" in res.reason
    assert [row[0] for row in app.rows("u1")] == ["a"]
    assert app.applications() == 1


def test_a_client_id_registered_to_another_principal_gets_403(notes_app):
    app = notes_app()
    device = app.client("t1")
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "mine"})
    assert device.sync("Sync").applied == 1

    stolen = post_sync(
        app.url, "Push", token="t2", client_id=device.client_id,
        mutations=[_note(2, "b", owner="u2")],
    )  # fmt: skip
    assert stolen.status_code == 403
    assert stolen.json()["code"] == "forbidden"

    # The same local database opened with another user's token is refused too.
    other = app.client("t2")  # the same device file
    other.insert("LocalNote", {"id": "c", "owner": "u2", "title": "theirs"})
    with pytest.raises(AuthError) as err:
        other.sync("Push")
    assert err.value.status == 403
    assert app.rows("u2") == []
    assert app.last_seq(device.client_id) == 1


# -- mapping back and validation (the hospital example) --------------------------------------------


def test_invalid_mutations_are_rejected_naming_the_column_and_the_rest_still_apply(
    client, store, server, in_sync
):
    client.sync("Online")
    a, b, c, d = appointments_of(store, 1)[:4]
    before = {k: _server_appointment(store, k) for k in (a, b, c)}
    client.update("LocalAppointment", a, {"doctor_name": "Dr. Nobody"})  # read-only (joined)
    client.update("LocalAppointment", b, {"starts_at": "not a date"})
    client.update("LocalAppointment", c, {"doctor_id": "abc"})
    client.update("LocalAppointment", d, {"notes": "still applied"})

    result = client.sync("Online")

    assert result.applied == 1
    by_key = {r.key: r for r in client.outbox.rejected()}
    assert set(by_key) == {a, b, c}
    assert all(r.status == "rejected" for r in by_key.values())
    assert (by_key[a].code, by_key[b].code, by_key[c].code) == (
        "read-only-column",
        "invalid-value",
        "invalid-value",
    )
    assert "doctor_name" in by_key[a].reason
    assert "starts_at" in by_key[b].reason
    assert "not a date" in by_key[b].reason
    assert "doctor_id" in by_key[c].reason
    assert "abc" in by_key[c].reason
    assert {k: _server_appointment(store, k) for k in (a, b, c)} == before
    assert _server_appointment(store, d)["notes"] == "still applied"
    # The rejected rows show the server's values again; nothing is pending.
    assert client.outbox.pending() == []
    in_sync(client, "Online")


def test_an_unknown_column_in_a_mutation_is_rejected_naming_it(live, store):
    a, b = appointments_of(store, 1)[:2]
    mutations = [
        Mutation(seq=1, id="m1", table="LocalAppointment", key=a, op="update",
                 values={"colour": "red"}, changed=["colour"]),
        Mutation(seq=2, id="m2", table="LocalAppointment", key=b, op="update",
                 values={"notes": "fine"}, changed=["notes"]),
    ]  # fmt: skip
    r = push_results(
        post_sync(
            live.url, "SendAppointments", token="token-h1", client_id="raw", mutations=mutations
        )
    )
    first, second = r.results
    assert (first.status, first.code) == ("rejected", "unknown-column")
    assert "colour" in first.reason
    assert second.status == "applied"
    assert _server_appointment(store, b)["notes"] == "fine"


def test_a_column_added_locally_is_local_only(client, store, in_sync):
    """A column the app adds itself holds local data: not pushed, kept across pulls."""
    client.sync("Online")
    a = appointments_of(store, 1)[0]
    client.store.conn.execute('ALTER TABLE "LocalAppointment" ADD COLUMN colour TEXT')
    client.update("LocalAppointment", a, {"colour": "red"})

    assert client.outbox.count() == 0
    result = client.sync("Online")

    assert (result.rows_out, result.rejected) == (0, [])
    assert client.store.query('SELECT colour FROM "LocalAppointment" WHERE id = ?', (a,)) == [
        ("red",)
    ]
    in_sync(client, "Online")


def test_an_insert_may_leave_columns_with_server_defaults_empty(client, store, in_sync):
    client.sync("Online")
    key = client.insert(
        "LocalAppointment",
        {
            "doctor_id": 1,
            "patient_id": 5,
            "starts_at": SLOT["starts_at"],
            "ends_at": SLOT["ends_at"],
        },
    )

    result = client.sync("Online")

    assert (result.applied, result.rejected) == (1, [])
    row = _server_appointment(store, key)
    assert (row["status"], row["room"], row["notes"]) == ("booked", "", "")
    in_sync(client, "Online")


def test_a_stream_declared_with_a_column_list_is_served(tmp_path):
    meta = sa.MetaData()
    t = sa.Table(
        "thing", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("x", sa.Text)
    )
    schema = SyncSchema([SyncUnit("All", [Stream("things", t, [t.c.id, t.c.x])], "both")])
    srv = SyncServer(
        schema,
        f"sqlite:///{tmp_path / 'list.sqlite'}",
        authenticate=TokenAuth({"t": Principal("p")}),
        install=False,
    )
    assert [c.name for c in srv.catalog.streams[0].columns] == ["id", "x"]


# -- the pull that follows a push ------------------------------------------------------------------


def test_pull_brings_the_authoritative_row_after_the_push(client, store, in_sync):
    client.sync("Login")
    key = client.insert("LocalAppointment", {"doctor_id": 3, **SLOT})
    local = dict(zip(["doctor_name", "patient_name", "hospital"], client.store.query(
        'SELECT doctor_name, patient_name, hospital FROM "LocalAppointment" WHERE id = ?', (key,)
    )[0], strict=True))  # fmt: skip
    assert local == {"doctor_name": None, "patient_name": None, "hospital": None}

    result = client.sync("Online")

    assert result.applied == 1
    row = client.store.query(
        'SELECT doctor_name, patient_name, specialty, hospital FROM "LocalAppointment"'
        " WHERE id = ?",
        (key,),
    )[0]
    assert all(v for v in row), row
    in_sync(client, "Online")


def test_a_local_change_survives_a_pull_of_a_newer_server_version(
    client, store, plain_sql, in_sync
):
    client.sync("Login")
    key = appointments_of(store, 1)[0]
    old_room = client.store.query('SELECT room FROM "LocalAppointment" WHERE id = ?', (key,))[0][0]
    client.update("LocalAppointment", key, {"notes": "from the device"})
    plain_sql("UPDATE appointment SET room = 'R99' WHERE id = ?", (key,))

    result = client.sync("Login")  # pulls only; the change is not pushed yet

    assert result.rows_in["LocalAppointment"] == 1  # the newer server version came ...
    notes, room = client.store.query(
        'SELECT notes, room FROM "LocalAppointment" WHERE id = ?', (key,)
    )[0]
    assert (notes, room) == ("from the device", old_room)  # ... and left the row alone
    assert [p.key for p in client.outbox.pending()] == [key]

    assert client.sync("SendAppointments").applied == 1
    client.sync("Login")

    server_row = _server_appointment(store, key)
    assert (server_row["notes"], server_row["room"]) == ("from the device", "R99")  # merged
    notes, room = client.store.query(
        'SELECT notes, room FROM "LocalAppointment" WHERE id = ?', (key,)
    )[0]
    assert (notes, room) == ("from the device", "R99")
    in_sync(client, "Login")


# -- business rules --------------------------------------------------------------------------------


def test_two_devices_book_the_same_slot_the_second_is_rejected(make_client, store, in_sync):
    first = make_client(name="first")
    second = make_client(name="second")
    first.sync("Online")
    second.sync("Online")
    mine = first.insert("LocalAppointment", {"doctor_id": 3, **SLOT})
    theirs = second.insert("LocalAppointment", {"doctor_id": 3, **SLOT, "notes": "second"})

    assert first.sync("Online").applied == 1
    result = second.sync("Online")

    assert result.applied == 0
    [rejected] = result.rejected
    assert (rejected["key"], rejected["code"]) == (theirs, "rule")
    assert "doctor 3" in rejected["reason"]
    assert "2031-03-03 10:00" in rejected["reason"]
    assert "10:15" in rejected["reason"]
    [kept] = second.outbox.rejected()
    assert kept.attempted["notes"] == "second"
    assert _server_appointment(store, theirs) is None
    assert _server_appointment(store, mine) is not None
    assert theirs not in local_keys(second, "LocalAppointment")
    assert mine in local_keys(second, "LocalAppointment")
    first.sync("Online")
    in_sync(first, "Online")
    in_sync(second, "Online")


def test_a_rule_sees_the_row_after_the_change(client, store):
    client.sync("Online")
    a = appointments_of(store, 1)[0]
    row = _server_appointment(store, a)
    client.update(
        "LocalAppointment", a, {"ends_at": (row["starts_at"] - dt.timedelta(minutes=5)).isoformat()}
    )

    result = client.sync("Online")

    assert [r["reason"] for r in result.rejected] == ["an appointment must end after it starts"]
    assert _server_appointment(store, a) == row


# -- scope -----------------------------------------------------------------------------------------


def test_an_insert_for_a_doctor_of_another_hospital_is_out_of_scope(client, store, in_sync):
    client.sync("Online")
    before = _appointments(store)
    other_doctor = doctors_of(store, 2)[0]
    key = client.insert("LocalAppointment", {"doctor_id": other_doctor, **SLOT})
    fine = client.insert("LocalAppointment", {"doctor_id": 1, **SLOT})

    result = client.sync("Online")

    assert result.applied == 1
    [rejected] = result.rejected
    assert (rejected["key"], rejected["code"]) == (key, "out-of-scope")
    assert [k for k in (key, fine) if _server_appointment(store, k)] == [fine]
    assert len(_appointments(store)) == len(before) + 1
    assert key not in local_keys(client, "LocalAppointment")
    in_sync(client, "Online")


def test_moving_an_appointment_to_another_hospital_is_out_of_scope(client, store, in_sync):
    client.sync("Online")
    a = appointments_of(store, 1)[0]
    row = _server_appointment(store, a)
    client.update("LocalAppointment", a, {"doctor_id": doctors_of(store, 2)[0]})

    result = client.sync("Online")

    assert [r["code"] for r in result.rejected] == ["out-of-scope"]
    assert _server_appointment(store, a) == row
    in_sync(client, "Online")


def test_changes_to_another_hospitals_appointment_are_out_of_scope_and_reveal_nothing(live, store):
    theirs = appointments_of(store, 2)[:3]
    before = _appointments(store)
    mutations = [
        Mutation(seq=1, id="m1", table="LocalAppointment", key=theirs[0], op="update",
                 values={"notes": "mine now"}, changed=["notes"]),
        Mutation(seq=2, id="m2", table="LocalAppointment", key=theirs[1], op="delete"),
        Mutation(seq=3, id="m3", table="LocalAppointment", key=theirs[2], op="insert",
                 values={"id": theirs[2], "doctor_id": 1, **SLOT}),
    ]  # fmt: skip

    r = push_results(
        post_sync(
            live.url, "SendAppointments", token="token-h1", client_id="raw", mutations=mutations
        )
    )

    assert [(x.status, x.code) for x in r.results] == [("rejected", "out-of-scope")] * 3
    assert [x.server_row for x in r.results] == [None] * 3  # no peek into another hospital
    assert _appointments(store) == before


def test_pushes_need_a_pushing_unit(live, store):
    a = appointments_of(store, 1)[0]
    m = Mutation(seq=1, id="m1", table="LocalAppointment", key=a, op="update",
                 values={"notes": "x"}, changed=["notes"])  # fmt: skip
    r = post_sync(live.url, "Login", token="token-h1", client_id="raw", mutations=[m])
    assert r.status_code == 422
    assert _server_appointment(store, a)["notes"] != "x"


def test_push_results_decode_as_the_protocol_says(notes_app):
    """The first frame of a pushing unit's response is ``PushResults``, one result per mutation."""
    app = notes_app()
    r = post_sync(app.url, "Sync", token="t1", client_id="raw", mutations=[_note(1, "a")])
    pushed = push_results(r)
    assert isinstance(pushed, PushResults)
    [res] = pushed.results
    assert (res.seq, res.id, res.status) == (1, "m1", "applied")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(pushed), type=PushResults) == pushed


def test_a_seq_below_one_is_refused_not_answered_as_applied(notes_app):
    app = notes_app()
    r = post_sync(app.url, "Push", token="t1", client_id="raw", mutations=[_note(0, "a")])
    assert r.status_code == 422
    assert r.json()["code"] == "invalid-request"
    assert app.rows("u1") == []


# -- failing application code on the server ----------------------------------------------------


def test_a_rule_that_fails_rejects_its_mutation_and_blocks_nothing(notes_app):
    def fragile(ctx: MutationContext) -> str | None:
        if ctx.row["title"] == "boom":
            raise KeyError("a bug in the app's rule")
        return None

    app = notes_app(rules=[fragile])
    device = app.client()
    device.insert("LocalNote", {"id": "x", "owner": "u1", "title": "boom"})
    device.insert("LocalNote", {"id": "y", "owner": "u1", "title": "fine"})

    result = device.sync("Sync")

    assert result.applied == 1
    [kept] = device.outbox.rejected()
    assert (kept.key, kept.status, kept.code) == ("x", "rejected", "rule")
    assert "fragile" in kept.reason
    assert "a bug in the app's rule" not in kept.reason  # no internals to clients
    assert app.row("x") is None
    assert app.row("y")["title"] == "fine"
    device.insert("LocalNote", {"id": "z", "owner": "u1", "title": "later"})
    assert device.sync("Sync").applied == 1
    assert local_notes(device) == app.rows("u1")


@pytest.mark.backends("postgres")
def test_a_push_that_loses_its_database_connection_is_sent_again_and_applied_once(notes_app):
    """The database ends the connection a push is applying on (a failover, a
    restart): nothing of it is applied, the device is told (503
    ``database-unavailable``, ``Retry-After``) and keeps its changes pending, and its
    next sync applies each of them once."""
    ended: list[str] = []

    def connection_ends(ctx: MutationContext) -> str | None:
        if ctx.row["title"] == "second" and not ended:
            ended.append(ctx.key)
            ctx.conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        return None

    app = notes_app(rules=[connection_ends])
    device = app.client()
    device.insert("LocalNote", {"id": "a", "owner": "u1", "title": "first"})
    device.insert("LocalNote", {"id": "b", "owner": "u1", "title": "second"})

    with pytest.raises(ProblemError) as failed:
        device.sync("Sync")

    assert (failed.value.status, failed.value.code) == (503, "database-unavailable")
    assert failed.value.extra.get("retry_after") == 1
    assert ended == ["b"]
    assert app.rows("u1") == []  # the push's transaction went with its connection
    assert device.outbox.count() == 2
    result = device.sync("Sync")
    assert result.applied == 2
    assert (app.applications("a"), app.applications("b")) == (1, 1)
    assert device.outbox.count() == 0
    assert local_notes(device) == app.rows("u1")


def test_a_restored_server_refuses_the_gap_until_renew_epoch(
    client, store, db_backup, in_sync, monkeypatch
):
    """After a restore the server forgot applied seqs: a gap, then renew-epoch recovers."""
    monkeypatch.setattr(push_module, "PREDECESSOR_WAIT_S", 0.2)  # seq 1 never comes again
    client.sync("Online")
    saved = db_backup.save()
    first = client.insert("LocalAppointment", {**SLOT, "doctor_id": 1})
    assert client.sync("Online").applied == 1
    db_backup.restore(saved, store)  # the first booking and seq 1 are gone on the server
    second = client.insert(
        "LocalAppointment",
        {
            **SLOT,
            "doctor_id": 1,
            "starts_at": "2031-03-04T10:00:00",
            "ends_at": "2031-03-04T10:15:00",
        },
    )

    with pytest.raises(ProblemError) as refused:
        client.sync("Online")
    # PostgreSQL knows the restored database for another one, and refuses it whole.
    expected = "database-restored" if store.dialect == "postgresql" else "sequence-gap"
    assert refused.value.code == expected
    assert "renew-epoch" in refused.value.detail
    assert _server_appointment(store, second) is None

    store.renew_epoch()
    result = client.sync("Online")

    assert result.applied == 1
    assert _server_appointment(store, second) is not None
    assert _server_appointment(store, first) is None  # lost with the restore, and not local either
    in_sync(client, "Online")


def test_after_renew_epoch_a_batch_that_came_first_waits_for_the_unanswered_before_it(
    notes_app,
):
    """renew-epoch forgot every client's sequence. A batch that reaches the server before
    the one before it (sent at once, on another connection) does not restart the
    sequence at its own first seq: the client's lowest unanswered seq does, so it waits
    for the earlier batch as after any gap, and both are applied, in order."""
    app = notes_app()
    pushed = post_sync(app.url, "Push", token="t1", client_id="raw", mutations=[_note(1, "a")])
    assert [r.status for r in push_results(pushed).results] == ["applied"]
    app.server.store.renew_epoch()
    earlier = [_note(2, "b"), _note(3, "c")]
    later = [_note(4, "d"), _note(5, "e")]

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            post_sync,
            app.url,
            "Push",
            token="t1",
            client_id="raw",
            mutations=later,
            unanswered_from=2,
        )
        time.sleep(0.3)  # it is waiting for seqs 2 and 3
        assert not waiting.done()
        first = post_sync(
            app.url, "Push", token="t1", client_id="raw", mutations=earlier, unanswered_from=2
        )
        then = waiting.result()

    assert [r.status for r in push_results(first).results] == ["applied"] * 2
    assert [r.status for r in push_results(then).results] == ["applied"] * 2
    assert [r[0] for r in app.rows()] == ["a", "b", "c", "d", "e"]
    versions = [app.version(k) for k in "bcde"]
    assert versions == sorted(versions)
    assert versions[1] < versions[2]  # b and c, then d and e
    assert app.last_seq("raw") == 5


def test_a_batch_waits_for_the_one_before_while_it_is_being_applied(notes_app, monkeypatch):
    """The wait for a batch's predecessor ends after a while if it does not come, not
    while it is being applied (a large batch may take longer than the wait)."""
    monkeypatch.setattr(push_module, "PREDECESSOR_WAIT_S", 4.0)
    waits = threading.Event()
    started: list[float] = []
    wait_for_predecessor = PushApplier._wait_for_predecessor

    def waiting_since(self: PushApplier, req: Any, seen: int, deadline: float) -> bool:
        if not started:
            started.append(time.monotonic())
            waits.set()
        return wait_for_predecessor(self, req, seen, deadline)

    monkeypatch.setattr(PushApplier, "_wait_for_predecessor", waiting_since)

    def slow(ctx: MutationContext) -> str | None:
        if ctx.row["title"] == "slow":  # applied until well past the waiter's deadline
            time.sleep(
                max(0.0, started[0] + push_module.PREDECESSOR_WAIT_S + 1.0 - time.monotonic())
            )
        return None

    app = notes_app(rules=[slow])
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            post_sync, app.url, "Push", token="t1", client_id="raw", mutations=[_note(2, "b")]
        )
        assert waits.wait(10), "the later batch never waited for the one before it"
        first = post_sync(
            app.url, "Push", token="t1", client_id="raw", mutations=[_note(1, "a", title="slow")]
        )
        then = waiting.result()

    assert first.status_code == then.status_code == 200
    assert [r.status for r in push_results(then).results] == ["applied"]
    assert [r[0] for r in app.rows()] == ["a", "b"]


def test_after_renew_epoch_a_change_below_the_restart_is_never_answered_applied(notes_app):
    """A client that does not say where its unanswered changes start: the later batch
    restarts the sequence, and the earlier one, arriving after it, finds no verdict in
    the log. It is rejected (the device keeps it for the app), not answered "applied"
    without having been applied."""
    app = notes_app()
    post_sync(app.url, "Push", token="t1", client_id="raw", mutations=[_note(1, "a")])
    app.server.store.renew_epoch()

    later = post_sync(
        app.url, "Push", token="t1", client_id="raw", mutations=[_note(4, "d"), _note(5, "e")]
    )
    earlier = post_sync(
        app.url, "Push", token="t1", client_id="raw", mutations=[_note(2, "b"), _note(3, "c")]
    )

    assert [r.status for r in push_results(later).results] == ["applied"] * 2
    results = push_results(earlier).results
    assert [(r.status, r.code) for r in results] == [("rejected", "out-of-order")] * 2
    assert "restored" in results[0].reason
    assert [r[0] for r in app.rows()] == ["a", "d", "e"]


def test_rules_see_deletes(notes_app):
    """A business rule runs for deletes too, with the row being deleted."""
    seen: list[tuple[str, Any]] = []

    def no_deleting_pinned(ctx: MutationContext) -> str | None:
        seen.append((ctx.op, ctx.row.get("title")))
        return "pinned notes stay" if ctx.op == "delete" and ctx.row["title"] == "pinned" else None

    app = notes_app(policy=LastWriteWins(), rules=[no_deleting_pinned])
    device = app.client()
    device.sync("Sync")
    device.insert("LocalNote", {"id": "p", "owner": "u1", "title": "pinned", "body": "", "n": 0})
    device.sync("Sync")
    device.delete("LocalNote", "p")

    result = device.sync("Sync")

    assert [(r["key"], r["reason"]) for r in result.rejected] == [("p", "pinned notes stay")]
    assert ("delete", "pinned") in seen
    assert app.row("p") is not None


# -- values as the column types take them ----------------------------------------------------------


def _typed_server(database: str, *columns: sa.Column[Any], key: Any = None) -> tuple[Any, sa.Table]:
    """A server of one ``item`` table (``LocalItem``, unit ``Items``, token ``t``) of an
    ``owner`` and ``columns``, keyed by ``key`` (a text ``id`` by default)."""
    from tests.support import owned_table_server

    item = sa.Table(
        "item", sa.MetaData(),
        key if key is not None else sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        *columns,
    )  # fmt: skip
    return owned_table_server(database, item, "LocalItem", "Items"), item


def test_a_uuid_column_read_as_text_takes_pushed_changes(serve, new_database, tmp_path):
    """``Uuid(as_uuid=False)`` (``Mapped[str]``), as the key and as a value: an edit and
    a new row apply (the value stored in lower case), and the outbox drains."""
    from syncunit import SyncClient

    server, item = _typed_server(
        new_database("items"),
        sa.Column("ref", sa.Uuid(as_uuid=False), nullable=True),
        key=sa.Column("id", sa.Uuid(as_uuid=False), primary_key=True),
    )
    old, new, ref = "0190a0ee-0000-7000-8000-00000000000a", str(uuid.uuid4()), uuid.uuid4()
    with server.store.engine.begin() as conn:
        conn.execute(item.insert().values(id=old, owner="ana"))
    device = SyncClient(serve(server.app).url, tmp_path / "items.sqlite", token="t")
    try:
        device.sync("Items")
        device.update("LocalItem", old, {"ref": str(ref).upper()})
        device.insert("LocalItem", {"id": new, "owner": "ana"})

        result = device.sync("Items")

        assert (result.applied, result.conflicts, result.rejected) == (2, [], [])
        assert device.outbox.count() == 0
        with server.store.engine.connect() as conn:
            stored = dict(conn.execute(sa.select(item.c.id, item.c.ref)).all())
        assert stored == {old: str(ref), new: None}
        assert sorted(device.store.query("SELECT id, ref FROM LocalItem")) == sorted(
            [(old, str(ref)), (new, None)]
        )
    finally:
        device.close()
        server.store.engine.dispose()


def test_a_refused_change_whose_row_cannot_be_read_back_is_still_answered(notes_app, monkeypatch):
    """The row sent back with a refusal is read after the change failed; should that
    read fail too, the refusal stands without a row and the push goes on."""
    from syncunit.server import mutation

    def unreadable(s: Stream) -> sa.Select[Any]:
        missing = sa.table("no_such_table", sa.column("id"))
        return sa.select(missing.c.id).where(missing.c.id == sa.bindparam(mutation.KEY))

    monkeypatch.setattr(mutation, "_row_select", unreadable)
    app = notes_app(policy=LastWriteWins())
    mutations = [_note(1, "a", n="not a number"), _note(2, "b")]

    r = post_sync(app.url, "Sync", token="t1", client_id="dev", mutations=mutations)

    first, second = push_results(r).results
    assert (first.status, first.code, first.server_row) == ("rejected", "invalid-value", None)
    assert second.status == "applied"
    assert app.row("a") is None
    assert app.row("b") is not None


def test_a_value_its_column_type_refuses_is_rejected_naming_the_column(
    serve, new_database, tmp_path, backend, caplog
):
    """A decimal past its column's precision and JSON holding NaN, which PostgreSQL
    refuses (SQLite stores them as sent), and on either database a label the Enum does
    not declare and a signalling NaN: ``invalid-value`` naming the column, the good rows
    applied (the run of new rows tried as one batch first), nothing logged as an error."""
    from syncunit import SyncClient

    caplog.set_level(logging.INFO, logger="syncunit")
    server, _ = _typed_server(
        new_database("items"),
        sa.Column("amount", sa.Numeric(6, 2), nullable=True),
        sa.Column("doc", sa.JSON, nullable=True),
        sa.Column("mood", sa.Enum("happy", "sad", name="mood"), nullable=True),
    )
    device = SyncClient(serve(server.app).url, tmp_path / "items.sqlite", token="t")
    try:
        good = {"owner": "ana", "amount": "9999.99", "doc": "{}", "mood": "happy"}
        for key, odd in [
            ("ok", {}),
            ("ok2", {"mood": "sad"}),
            ("big", {"amount": "9999.995"}),
            ("nan", {"doc": '{"x": [NaN]}'}),
            ("mood", {"mood": "angry"}),
        ]:
            device.insert("LocalItem", {"id": key, **good, **odd})

        result = device.sync("Items")
        device.insert("LocalItem", {"id": "snan", **good, "amount": "sNaN"})
        [snan] = device.sync("Items").rejected

        refused = {r["key"]: (r["code"], r["reason"]) for r in result.rejected}
        assert refused.pop("mood") == (
            "invalid-value",
            "column 'mood' expects one of 'happy', 'sad', got 'angry'",
        )
        assert (snan["code"], snan["reason"]) == (
            "invalid-value",
            "column 'amount' expects a decimal number as a string, got 'sNaN'",
        )
        if backend == "postgres":
            assert {key: code for key, (code, _) in refused.items()} == {
                "big": "invalid-value",
                "nan": "invalid-value",
            }
            assert refused["big"][1].startswith("column 'amount': the database refused a value")
            assert refused["nan"][1].startswith("column 'doc': the database refused a value")
            assert result.applied == 2
        else:
            assert (refused, result.applied) == ({}, 4)
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    finally:
        device.close()
        server.store.engine.dispose()


class _Picky(sa.types.TypeDecorator[str]):
    """Text that refuses one value as it is bound (a failure the database never sees)."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        if value == "boom":
            raise ValueError("this type refuses 'boom'")
        return value


def test_a_failed_change_is_logged_without_the_rows_values(serve, new_database, tmp_path, caplog):
    """A change the server fails on is rejected (``server-error``) and logged with the
    reason and the statement, never with the values it was to write (the row's data)."""
    from syncunit import SyncClient

    caplog.set_level(logging.INFO, logger="syncunit")
    server, _ = _typed_server(
        new_database("items"),
        sa.Column("picky", _Picky(20), nullable=True),
        sa.Column("secret", sa.String(40), nullable=True),
    )
    device = SyncClient(serve(server.app).url, tmp_path / "items.sqlite", token="t")
    try:
        device.insert("LocalItem", {"id": "a", "owner": "ana", "picky": "boom", "secret": "s3cr3t"})

        result = device.sync("Items")

        assert [(r["key"], r["code"]) for r in result.rejected] == [("a", "server-error")]
        [logged] = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert "this type refuses 'boom'" in logged
        assert "INSERT INTO item" in logged
        assert "s3cr3t" not in logged
    finally:
        device.close()
        server.store.engine.dispose()


def test_a_devices_null_in_a_json_column_is_stored_as_sql_null(serve, new_database, tmp_path):
    """NULL in a JSON column of a device (a new row, alone or in a run of them, or an
    edit to NULL) is SQL NULL on the server, not the JSON value ``null``."""
    from syncunit import SyncClient
    from tests.test_hostile import _documents_server

    server, doc = _documents_server(new_database("docs"))
    with server.store.engine.begin() as conn:
        conn.execute(doc.insert().values(id="s", owner="ana", j={"a": 1}, jb=[1]))
    device = SyncClient(serve(server.app).url, tmp_path / "doc.sqlite", token="t-ana")
    try:
        device.sync("Docs")
        device.insert("LocalDoc", {"id": "alone", "owner": "ana"})
        device.update("LocalDoc", "s", {"j": None, "jb": None})
        assert device.sync("Docs").applied == 2
        for i in range(5):  # a run of new rows: written as one batch
            device.insert("LocalDoc", {"id": f"run{i}", "owner": "ana", "jb": None})
        assert device.sync("Docs").applied == 5

        with server.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(doc.c.id, doc.c.j.is_(sa.null()), doc.c.jb.is_(sa.null()))
            ).all()
        keys = ["alone", *(f"run{i}" for i in range(5)), "s"]
        assert sorted(rows) == [(key, True, True) for key in keys]
    finally:
        device.close()
        server.store.engine.dispose()
