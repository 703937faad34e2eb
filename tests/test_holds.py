"""Which rows go when a hold is released: a forbidden unit, a row with an unpushed change.

Forgetting a unit the principal may no longer run releases what that unit (or
a subscription of it) holds, and nothing another unit holds. A removal that
finds the row with an unpushed change (pulls don't clobber) is put off, and
carried out once the change is answered, unless the server sent the row again.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import sqlalchemy as sa
from hospital.models import appointment, doctor, staff
from hospital.units import appointment_columns, appointment_joins, my_hospital
from hospital.units import schema as hospital_schema

from syncunit import Stream, SyncSchema, SyncUnit
from syncunit.client.scheduler import subscription_id
from syncunit.errors import ProblemError
from syncunit.server import Principal, SyncServer, TokenAuth
from syncunit.server.store import tombstones
from tests.support import appointments_of, local_keys, principal_params
from tests.test_subscriptions import history, patients_of

APP_UNITS = frozenset({"Login", "Online", "SendAppointments", "Splash"})


@pytest.fixture
def revocable(make_server: Any, serve: Any, store: Any) -> tuple[Any, dict[str, Any]]:
    """A server whose principal's units can be narrowed mid-test: (live server, {"units"})."""
    make_server()  # tracking and rows, as the hospital server has them
    allowed: dict[str, Any] = {"units": None}

    def lookup(token: str) -> Principal | None:
        with store.engine.connect() as conn:
            row = conn.execute(
                sa.select(staff.c.id, staff.c.hospital_id).where(staff.c.token == token)
            ).first()
        if row is None:
            return None
        params = {"hospital_id": row.hospital_id}
        return Principal(id=f"staff:{row.id}", params=params, units=allowed["units"])

    app = SyncServer(hospital_schema, store, authenticate=TokenAuth(lookup)).app
    return serve(app), allowed


def edit_notes(client: Any, key: str, notes: str) -> None:
    """The app changes a row (the outbox records it)."""
    with client.store.atomic() as c:
        c.execute("UPDATE LocalAppointment SET notes = ? WHERE id = ?", (notes, key))


def pending(client: Any) -> int:
    return int(client.store.query("SELECT count(*) FROM syncunit_outbox")[0][0])


def engine_rows(client: Any, table: str) -> list[tuple[Any, ...]]:
    return client.store.query(f"SELECT * FROM {table}")


def move_to_patient(store: Any, key: str, patient_id: int) -> None:
    with store.write() as conn:
        conn.execute(
            appointment.update().where(appointment.c.id == key).values(patient_id=patient_id)
        )


# -- a unit the principal may no longer run --------------------------------------------------


def test_a_forbidden_subscription_unit_removes_its_rows_and_keeps_logins(
    server, revocable, make_client, store, in_sync
):
    live, allowed = revocable
    dev = make_client(url=live.url)
    dev.sync("Login")
    login_rows = local_keys(dev, "LocalAppointment")
    a = patients_of(store, 1)[0]
    dev.sync("PatientDetails", params={"patient_id": a})
    assert local_keys(dev, "LocalPatient") == {a}

    allowed["units"] = APP_UNITS
    with pytest.raises(ProblemError) as err:
        dev.sync("PatientDetails", params={"patient_id": a})
    assert (err.value.status, err.value.code) == (403, "unit-forbidden")

    assert dev.subscriptions() == []
    assert local_keys(dev, "LocalPatient") == set()
    assert local_keys(dev, "LocalAppointment") == login_rows  # Login's rows all stay
    assert engine_rows(dev, "syncunit_holds") == []
    cursors = {r[0] for r in engine_rows(dev, "syncunit_cursors")}
    assert cursors == {"appointments", "doctors"}
    dev.sync("Login")
    in_sync(dev)


def test_a_forbidden_unit_without_parameters_keeps_a_changed_row_until_its_push(
    server, revocable, make_client, store
):
    """The principal may no longer pull appointments (it may still push them): Login's
    rows go at once, the one with an unpushed change once the push is answered."""
    live, allowed = revocable
    dev = make_client(url=live.url)
    dev.sync("Login")
    changed = sorted(local_keys(dev, "LocalAppointment"))[0]
    edit_notes(dev, changed, "seen today")

    allowed["units"] = frozenset({"SendAppointments", "Splash"})
    with pytest.raises(ProblemError) as refusal:
        dev.sync("Login")
    assert refusal.value.code == "unit-forbidden"
    assert local_keys(dev, "LocalAppointment") == {changed}  # kept for its change

    assert dev.sync("SendAppointments").applied == 1
    with store.engine.connect() as conn:
        notes = conn.execute(sa.select(appointment.c.notes).where(appointment.c.id == changed))
        assert notes.scalar_one() == "seen today"
    assert local_keys(dev, "LocalAppointment") == set()


def test_a_forbidden_unit_keeps_a_changed_row_until_its_push_is_answered(
    server, revocable, make_client, store
):
    live, allowed = revocable
    dev = make_client(url=live.url)
    a = patients_of(store, 1)[0]
    dev.sync("PatientDetails", params={"patient_id": a})
    changed = history(store, a)[0]
    edit_notes(dev, changed, "seen today")

    allowed["units"] = APP_UNITS
    with pytest.raises(ProblemError):
        dev.sync("PatientDetails", params={"patient_id": a})
    assert local_keys(dev, "LocalAppointment") == {changed}  # pulls don't clobber

    result = dev.sync("SendAppointments")
    assert result.applied == 1
    assert local_keys(dev, "LocalAppointment") == set()  # nothing holds it any more
    assert engine_rows(dev, "syncunit_deferred") == []
    with store.engine.connect() as conn:
        notes = conn.execute(sa.select(appointment.c.notes).where(appointment.c.id == changed))
        assert notes.scalar_one() == "seen today"


def test_a_held_subscription_of_a_forbidden_unit_is_dropped_and_online_goes_on(
    server, revocable, make_client, store, in_sync
):
    # The server refuses a whole request that carries a subscription of a unit the
    # principal may not run, naming that unit in the problem's ``unit``.
    live, allowed = revocable
    errors: list[tuple[str, Exception]] = []
    dev = make_client(
        url=live.url, sync_on_reconnect="Online", on_error=lambda u, e: errors.append((u, e))
    )
    a = patients_of(store, 1)[0]
    dev.sync("Online")
    online_rows = local_keys(dev, "LocalAppointment")
    dev.sync("PatientDetails", params={"patient_id": a})
    dev.sync("Online")  # refreshes the subscription beside it

    allowed["units"] = APP_UNITS
    result = dev.sync("Online")

    assert result.requests == 2  # refused whole, then again without the subscription
    assert dev.subscriptions() == []
    assert [(u, e.code) for u, e in errors] == [  # type: ignore[attr-defined]
        (f'PatientDetails?{{"patient_id":{a}}}', "unit-forbidden")
    ]
    assert errors[0][1].extra["unit"] == "PatientDetails"  # type: ignore[attr-defined]
    assert local_keys(dev, "LocalPatient") == set()
    assert local_keys(dev, "LocalAppointment") == online_rows
    dev.sync("Online")
    in_sync(dev, "Online")


def open_unanswered(dev: Any, unit: str, params: dict[str, Any]) -> str:
    """Record a subscription as a run does before its request, and no more (the process
    was killed, or the network failed, before the server's answer)."""
    sub_id = subscription_id(unit, params)
    dev.store.open_subscription(sub_id, unit, sub_id.partition("?")[2], dev.clock(), None)
    return sub_id


def test_a_held_subscription_the_server_refuses_is_closed_and_online_pushes(
    server, make_client, store
):
    errors: list[tuple[str, Exception]] = []
    dev = make_client(sync_on_reconnect="Online", on_error=lambda u, e: errors.append((u, e)))
    a = patients_of(store, 1)[0]
    dev.sync("Online")
    dev.sync("PatientDetails", params={"patient_id": a})
    refused = open_unanswered(dev, "PatientDetails", {"patient_id": 0})  # min is 1
    changed = sorted(local_keys(dev, "LocalAppointment") - set(history(store, a)))[0]
    edit_notes(dev, changed, "pushed at last")

    result = dev.sync("Online")

    assert result.requests == 2  # refused whole, then again without that subscription
    assert result.applied == 1
    assert pending(dev) == 0
    with store.engine.connect() as conn:
        notes = conn.execute(sa.select(appointment.c.notes).where(appointment.c.id == changed))
        assert notes.scalar_one() == "pushed at last"
    assert dev.subscriptions() == [("PatientDetails", {"patient_id": a})]  # the good one stays
    assert [(u, e.code) for u, e in errors] == [(refused, "invalid-parameter")]  # type: ignore[attr-defined]
    assert errors[0][1].extra["subscription"] == refused  # type: ignore[attr-defined]
    assert set(history(store, a)) <= local_keys(dev, "LocalAppointment")
    assert local_keys(dev, "LocalPatient") == {a}


def test_a_refused_subscription_is_closed_by_a_later_call_that_did_not_open_it(
    server, make_client, store
):
    dev = make_client()
    dev.sync("Login")
    open_unanswered(dev, "PatientDetails", {"patient_id": 0})
    with pytest.raises(ProblemError) as err:
        dev.sync("PatientDetails", params={"patient_id": 0})
    assert (err.value.status, err.value.code) == (400, "invalid-parameter")
    assert dev.subscriptions() == []
    assert engine_rows(dev, "syncunit_holds") == []


# -- removals put off for rows with unpushed changes -----------------------------------------


@pytest.mark.parametrize("how", ["moved", "closed", "expired"])
def test_a_released_row_with_a_change_goes_once_the_push_is_answered(
    how, make_client, store, clock
):
    dev = make_client(clock=clock)
    a, b = patients_of(store, 1)[:2]
    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=60)
    changed = history(store, a)[0]
    edit_notes(dev, changed, "device note")
    if how == "moved":  # the server moves the appointment to another patient
        move_to_patient(store, changed, b)
        dev.sync("PatientDetails", params={"patient_id": a})
    elif how == "closed":
        dev.unsubscribe("PatientDetails", {"patient_id": a})
    else:
        clock.advance(61)
        dev.expire_subscriptions()
    assert changed in local_keys(dev, "LocalAppointment")  # kept for its change

    assert dev.sync("SendAppointments").applied == 1
    assert pending(dev) == 0
    assert changed not in local_keys(dev, "LocalAppointment")
    if how == "moved":
        dev.sync("PatientDetails", params={"patient_id": a})
        assert local_keys(dev, "LocalAppointment") == set(history(store, a))
    else:
        assert local_keys(dev, "LocalAppointment") == set()
    assert engine_rows(dev, "syncunit_deferred") == []


def test_a_row_the_server_sends_again_stays_after_the_push(make_client, store):
    dev = make_client()
    a, b = patients_of(store, 1)[:2]
    dev.sync("PatientDetails", params={"patient_id": a})
    dev.sync("PatientDetails", params={"patient_id": b})
    changed = history(store, a)[0]
    edit_notes(dev, changed, "device note")
    move_to_patient(store, changed, b)
    dev.sync("PatientDetails", params={"patient_id": a})  # a lets go of it
    dev.sync("PatientDetails", params={"patient_id": b})  # b holds it now
    assert dev.sync("SendAppointments").applied == 1
    assert changed in local_keys(dev, "LocalAppointment")
    dev.unsubscribe("PatientDetails", {"patient_id": a})
    assert set(history(store, b)) <= local_keys(dev, "LocalAppointment")


# A pulled stream narrower than what the device may push: booked appointments only.
booked = Stream(
    "booked",
    appointment,
    appointment_columns,
    joins=appointment_joins,
    where=sa.and_(doctor.c.hospital_id == my_hospital, appointment.c.status == "booked"),
    local_table="LocalAppointment",
)
booked_schema = SyncSchema(
    [SyncUnit("Booked", [booked]), SyncUnit("Send", [booked], direction="push")]
)


def test_a_plain_row_that_left_the_scope_with_a_change_goes_after_the_push(
    server, make_server, serve, make_client, store
):
    dev = make_client(url=serve(make_server(booked_schema).app).url)
    dev.sync("Booked")
    changed = sorted(local_keys(dev, "LocalAppointment"))[0]
    edit_notes(dev, changed, "device note")
    with store.write() as conn:  # cancelled at the desk: it leaves what the device pulls
        conn.execute(
            appointment.update().where(appointment.c.id == changed).values(status="cancelled")
        )
    dev.sync("Booked")
    assert changed in local_keys(dev, "LocalAppointment")  # pulls don't clobber

    result = dev.sync("Send")  # the server refuses it out of scope: the row goes
    assert [r["code"] for r in result.rejected] == ["out-of-scope"]
    assert changed not in local_keys(dev, "LocalAppointment")
    dev.sync("Booked")
    want = {k for k, in store.engine.connect().execute(
        sa.select(appointment.c.id).join(doctor, appointment.c.doctor_id == doctor.c.id)
        .where(doctor.c.hospital_id == 1, appointment.c.status == "booked")
    )}  # fmt: skip
    assert local_keys(dev, "LocalAppointment") == want


def _let_go_with_a_change(dev: Any, store: Any) -> Any:
    """A row of one patient's history, changed on the device, then moved to another
    patient on the server: the subscription lets go of it, its change unpushed."""
    a, b = patients_of(store, 1)[:2]
    dev.sync("PatientDetails", params={"patient_id": a})
    changed = history(store, a)[0]
    edit_notes(dev, changed, "device note")
    move_to_patient(store, changed, b)
    dev.sync("PatientDetails", params={"patient_id": a})  # a lets go of it
    return changed


def test_a_row_logins_first_copy_brings_stays_after_the_push(make_client, store, in_sync):
    dev = make_client()
    changed = _let_go_with_a_change(dev, store)
    dev.sync("Login")  # still the hospital's: Login brings it (its change stays)
    assert dev.sync("SendAppointments").applied == 1
    assert changed in local_keys(dev, "LocalAppointment")
    dev.sync("Login")
    in_sync(dev)


def test_a_row_a_login_delta_brings_back_stays_after_the_push(make_client, store, in_sync):
    dev = make_client()
    a, b = patients_of(store, 1)[:2]
    dev.sync("Login")
    dev.sync("PatientDetails", params={"patient_id": a})
    changed = history(store, a)[0]
    edit_notes(dev, changed, "device note")
    with store.write() as conn:  # to another hospital: Login and a let go of it
        home = conn.execute(sa.select(appointment.c.doctor_id).where(appointment.c.id == changed))
        home_doctor = home.scalar_one()
        other = conn.execute(sa.select(doctor.c.id).where(doctor.c.hospital_id == 2)).scalar()
        conn.execute(
            appointment.update().where(appointment.c.id == changed).values(doctor_id=other)
        )
    dev.sync("Login")
    dev.sync("PatientDetails", params={"patient_id": a})
    with store.write() as conn:  # back, for another patient: Login's delta brings it
        conn.execute(
            appointment.update()
            .where(appointment.c.id == changed)
            .values(doctor_id=home_doctor, patient_id=b)
        )
    dev.sync("Login")
    assert dev.sync("SendAppointments").applied == 1
    assert changed in local_keys(dev, "LocalAppointment")
    dev.sync("Login")
    in_sync(dev)


def test_a_row_a_snapshot_file_brings_stays_after_the_push(
    make_server, live, make_client, store, tmp_path, in_sync
):
    server = make_server(snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1)
    live.app = server.app
    dev = make_client()
    changed = _let_go_with_a_change(dev, store)
    params = principal_params(store, "token-h1")
    for s in hospital_schema.units["Login"].streams:
        server.snapshots.build(s, params)
    assert dev.sync("Login").snapshots  # Login's first copy, from files, has it
    assert dev.sync("SendAppointments").applied == 1
    assert changed in local_keys(dev, "LocalAppointment")
    dev.sync("Login")
    in_sync(dev)


def test_put_off_removals_survive_a_restart(make_client, store):
    dev = make_client(name="device")
    a, b = patients_of(store, 1)[:2]
    dev.sync("PatientDetails", params={"patient_id": a})
    changed = history(store, a)[0]
    edit_notes(dev, changed, "device note")
    move_to_patient(store, changed, b)
    dev.sync("PatientDetails", params={"patient_id": a})
    dev.close()

    again = make_client(name="device")
    assert again.sync("SendAppointments").applied == 1
    assert changed not in local_keys(again, "LocalAppointment")


# -- a change refused out of the pushed stream's scope -----------------------------------------


def test_an_out_of_scope_rejection_of_a_held_row_brings_it_back_as_the_server_has_it(
    server, make_server, serve, make_client, store, in_sync
):
    """The pushed stream writes booked appointments only; a subscription shows a done one.
    A change to that row is refused out of scope, with no server row in the answer: the
    row goes, and the subscription copies afresh on its next refresh, bringing it back
    (and letting go of a row it no longer shows)."""
    schema = SyncSchema(
        [SyncUnit("Booked", [booked], direction="both"), hospital_schema.units["PatientDetails"]]
    )
    dev = make_client(url=serve(make_server(schema).app).url, sync_on_reconnect="Booked")
    a = patients_of(store, 1)[0]
    done, moved = history(store, a)[:2]
    with store.write() as conn:
        conn.execute(
            appointment.update().where(appointment.c.id.in_([done, moved])).values(status="done")
        )
    dev.sync("Booked")
    dev.sync("PatientDetails", params={"patient_id": a})
    assert done in local_keys(dev, "LocalAppointment")
    edit_notes(dev, done, "not mine to change")

    result = dev.sync("Booked")
    assert [(r["key"], r["code"]) for r in result.rejected] == [(done, "out-of-scope")]
    assert pending(dev) == 0
    with store.write() as conn:  # meanwhile gone, with no trace: the fresh copy lets it go
        conn.execute(appointment.delete().where(appointment.c.id == moved))
        conn.execute(sa.text("DELETE FROM syncunit_tombstones"))

    dev.sync("Booked")  # refreshes the subscription beside it
    with store.engine.connect() as conn:
        want = conn.execute(sa.select(appointment.c.notes).where(appointment.c.id == done))
        notes = want.scalar_one()
    assert dev.store.query("SELECT notes, status FROM LocalAppointment WHERE id = ?", (done,)) == [
        (notes, "done")
    ]
    assert set(history(store, a)) <= local_keys(dev, "LocalAppointment")
    assert moved not in local_keys(dev, "LocalAppointment")
    assert dev.sync("PatientDetails", params={"patient_id": a}).total_in == 0


# -- rows with unpushed changes, looked up by key ------------------------------------------------


def test_a_refresh_looks_up_pending_changes_by_the_keys_each_chunk_brings(make_client, store):
    """Each chunk looks up only its own rows among the changes waiting to be pushed,
    never every pending key of the table: subscriptions refreshed while thousands of
    changes wait cost what their rows cost. Rows with a change keep it."""
    dev = make_client(refresh_subscriptions_with=["Login"])
    dev.sync("Login")
    a, b = patients_of(store, 1)[:2]
    for p in (a, b):
        dev.sync("PatientDetails", params={"patient_id": p})
    edited = history(store, a)
    with dev.store.atomic() as c:
        c.executemany(
            "UPDATE LocalAppointment SET notes = 'offline' WHERE id = ?", [(k,) for k in edited]
        )
    with store.write() as conn:
        conn.execute(
            appointment.update().where(appointment.c.patient_id.in_([a, b])).values(room="moved")
        )
    traced: list[str] = []
    dev.store.conn.set_trace_callback(traced.append)
    try:
        dev.sync("Login")  # refreshes both subscriptions too
    finally:
        dev.store.conn.set_trace_callback(None)

    looked_up = [
        s for s in traced if s.startswith("SELECT") and "row_key FROM syncunit_outbox" in s
    ]
    assert looked_up  # the chunks' keys, a few hundred at a time
    assert [s for s in looked_up if "row_key IN (" not in s] == []
    rows = {
        k: (r, n) for k, r, n in dev.store.query("SELECT id, room, notes FROM LocalAppointment")
    }
    assert {rows[k] for k in edited} <= {(r, "offline") for r, _ in rows.values() if r != "moved"}
    assert {rows[k][0] for k in history(store, b)} == {"moved"}
    assert pending(dev) == len(edited)


@pytest.mark.parametrize("subscribed", [False, True], ids=["plain", "held"])
def test_a_fresh_copy_keeps_more_changed_rows_than_a_statement_binds_variables(
    make_client, store, subscribed
):
    """A reset keeps every row with an unpushed change, however many: they are not
    bound one variable each (SQLite allows 999 on older phones)."""
    dev = make_client()
    dev.sync("Login")
    if subscribed:  # rows subscriptions hold stay too: the plain stream starts over alone
        dev.sync("PatientDetails", params={"patient_id": patients_of(store, 1)[0]})
    mine = appointments_of(store, 1)
    stale, edited = mine[0], mine[1:]
    with dev.store.atomic() as c:
        c.execute("UPDATE LocalAppointment SET notes = 'offline' WHERE id != ?", (stale,))
    assert pending(dev) == len(edited) > 40
    dev.store.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 40)
    # Another database, without the hospital's appointments or their tombstones: the
    # fresh copy is a single chunk that brings no row.
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.id.in_(mine)))
        conn.execute(tombstones.delete())
        store._set_fact(conn, "epoch", "another-database")

    result = dev.sync("Login")

    assert "appointments" in result.resets
    rows = dict(dev.store.query("SELECT id, notes FROM LocalAppointment"))
    assert stale not in rows
    assert {rows[k] for k in edited} == {"offline"}  # pulls don't clobber
    assert pending(dev) == len(edited)
