"""Units with client parameters: what the app opens (a patient) syncs on its own.

A stream may take parameters from the app (``client.sync(unit, params=...)``)
beside the principal's: the server checks each value, and the principal's scope
always bounds the result. The device keeps cursors per unit and parameter
values, and records which subscription holds which row, so a row stays while
any subscription, or a stream without parameters, still holds it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hospital import units as hospital_units
from hospital.generate import generate
from hospital.models import appointment, doctor, patient
from hospital.units import appointment_columns, appointment_joins, my_hospital, patient_param
from hospital.units import schema as hospital_schema

from syncunit import Param, Stream, SyncSchema, SyncUnit
from syncunit.client.scheduler import subscription_id
from syncunit.errors import (
    DeclarationError,
    NetworkError,
    ProblemError,
    RequestRejected,
    UnknownUnitError,
)
from syncunit.protocol import (
    PROTOCOL_VERSION,
    Chunk,
    FrameDecoder,
    StreamStart,
    SyncRequest,
    content_type,
    encode_request,
)
from syncunit.server import Principal, SyncServer, TokenAuth
from tests.support import (
    db_state,
    expected_rows,
    local_keys,
    local_rows,
    principal_params,
    sent_keys,
    wait_until,
)
from tests.test_scheduler import Events, idle

H1 = {"hospital_id": 1}


def patients_of(store: Any, hospital_id: int) -> list[int]:
    """Patients with an appointment in ``hospital_id``, most appointments first."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(appointment.c.patient_id, sa.func.count())
            .join(doctor, appointment.c.doctor_id == doctor.c.id)
            .where(doctor.c.hospital_id == hospital_id)
            .group_by(appointment.c.patient_id)
            .order_by(sa.func.count().desc(), appointment.c.patient_id)
        ).all()
    return [r[0] for r in rows]


def history(store: Any, patient_id: int, hospital_id: int = 1) -> list[str]:
    """Keys of the patient's appointments in the hospital (what the history must hold)."""
    with store.engine.connect() as conn:
        return sorted(
            conn.execute(
                sa.select(appointment.c.id)
                .join(doctor, appointment.c.doctor_id == doctor.c.id)
                .where(doctor.c.hospital_id == hospital_id, appointment.c.patient_id == patient_id)
            ).scalars()
        )


def assert_subscription(server: Any, client: Any, patient_id: int) -> None:
    """The device holds exactly what PatientDetails selects for this patient."""
    params = {**principal_params(server.store, "token-h1"), "patient_id": patient_id}
    want = expected_rows(server, "patient_history", params)
    have = set(local_rows(client, server, "patient_history"))
    assert want
    assert set(want) <= have
    card = expected_rows(server, "patient_card", params)
    assert card
    assert set(card) <= set(client.store.rows("LocalPatient"))


def test_a_subscription_pulls_one_patient_and_reopening_it_is_a_delta(server, tapped, tap, store):
    p = patients_of(store, 1)[0]
    first = tapped.sync("PatientDetails", params={"patient_id": p})

    assert sorted(sent_keys(tap.last, "patient_history")) == history(store, p)
    assert local_keys(tapped, "LocalAppointment") == set(history(store, p))
    assert local_keys(tapped, "LocalPatient") == {p}
    assert first.rows_in["LocalPatient"] == 1
    assert first.requests == 1  # the catalog came inside the response
    assert_subscription(server, tapped, p)

    again = tapped.sync("PatientDetails", params={"patient_id": p})
    assert again.total_in == 0
    assert again.resets == []

    edited = history(store, p)[0]
    with store.write() as conn:
        conn.execute(appointment.update().where(appointment.c.id == edited).values(notes="x-ray"))
    delta = tapped.sync("PatientDetails", params={"patient_id": p})
    assert sent_keys(tap.last, "patient_history") == [edited]  # only the change travels
    assert delta.rows_in == {"LocalAppointment": 1, "LocalPatient": 0}
    assert tapped.store.query("SELECT notes FROM LocalAppointment WHERE id = ?", (edited,)) == [
        ("x-ray",)
    ]
    assert_subscription(server, tapped, p)


def test_two_patients_at_once_keep_their_own_cursors(server, tapped, tap, store):
    a, b = patients_of(store, 1)[:2]
    tapped.sync("PatientDetails", params={"patient_id": a})
    tapped.sync("PatientDetails", params={"patient_id": b})
    assert local_keys(tapped, "LocalPatient") == {a, b}
    assert local_keys(tapped, "LocalAppointment") == set(history(store, a) + history(store, b))

    moved = history(store, b)[0]
    with store.write() as conn:  # a backoffice moves one of b's appointments to a
        conn.execute(appointment.update().where(appointment.c.id == moved).values(patient_id=a))
    tapped.sync("PatientDetails", params={"patient_id": a})
    assert sent_keys(tap.last, "patient_history") == [moved]
    tapped.sync("PatientDetails", params={"patient_id": b})
    assert moved in {c for f in tap.last if isinstance(f, Chunk) for c in f.removed}
    # b's removal does not take the row: a holds it now.
    assert moved in local_keys(tapped, "LocalAppointment")
    assert_subscription(server, tapped, a)
    assert_subscription(server, tapped, b)
    assert {s[1]["patient_id"] for s in tapped.subscriptions()} == {a, b}


def test_closing_a_patient_keeps_what_login_holds(server, client, store, in_sync):
    client.sync("Login")
    login_rows = local_keys(client, "LocalAppointment")
    a, b = patients_of(store, 1)[:2]
    client.sync("PatientDetails", params={"patient_id": a})
    client.sync("PatientDetails", params={"patient_id": b})
    assert local_keys(client, "LocalAppointment") == login_rows  # Login holds them all

    removed = client.unsubscribe("PatientDetails", {"patient_id": a})

    assert removed == 1  # a's card; a's appointments stay, Login holds them
    assert local_keys(client, "LocalPatient") == {b}
    assert local_keys(client, "LocalAppointment") == login_rows
    in_sync(client)
    # Login drops a row b still holds only when b lets go too.
    kept = history(store, b)[0]
    with store.write() as conn:
        conn.execute(appointment.update().where(appointment.c.id == kept).values(notes="moved"))
    client.sync("Login")
    client.unsubscribe("PatientDetails", {"patient_id": b})
    assert kept in local_keys(client, "LocalAppointment")
    assert client.store.query("SELECT count(*) FROM syncunit_holds") == [(0,)]
    in_sync(client)


# A second parameterized unit filling LocalAppointment: one doctor's agenda.
doctor_agenda = Stream(
    "doctor_agenda",
    appointment,
    appointment_columns,
    joins=appointment_joins,
    where=sa.and_(
        doctor.c.hospital_id == my_hospital, appointment.c.doctor_id == sa.bindparam("doctor_id")
    ),
    local_table="LocalAppointment",
    client_params={"doctor_id": Param("integer", min=1)},
)
agenda_schema = SyncSchema(
    [*hospital_schema.units.values(), SyncUnit("DoctorAgenda", [doctor_agenda])]
)


def test_overlapping_subscriptions_release_only_their_own_rows(
    server, make_server, serve, make_client, store
):
    srv = make_server(agenda_schema)
    url = serve(srv.app).url
    dev = make_client(url=url)
    p = patients_of(store, 1)[0]
    both = history(store, p)[0]
    with store.engine.connect() as conn:
        d = conn.execute(
            sa.select(appointment.c.doctor_id).where(appointment.c.id == both)
        ).scalar_one()
        agenda = sorted(
            conn.execute(sa.select(appointment.c.id).where(appointment.c.doctor_id == d)).scalars()
        )
    dev.sync("PatientDetails", params={"patient_id": p})
    dev.sync("DoctorAgenda", params={"doctor_id": d})
    assert local_keys(dev, "LocalAppointment") == set(history(store, p)) | set(agenda)

    # The patient's appointment with this doctor goes to another patient: the patient
    # subscription lets go of it, the agenda still holds it (and sees the change).
    other = next(x for x in patients_of(store, 1) if x != p)
    with store.write() as conn:
        conn.execute(appointment.update().where(appointment.c.id == both).values(patient_id=other))
    dev.sync("PatientDetails", params={"patient_id": p})
    assert both in local_keys(dev, "LocalAppointment")
    dev.sync("DoctorAgenda", params={"doctor_id": d})
    assert dev.store.query("SELECT patient_id FROM LocalAppointment WHERE id = ?", (both,)) == [
        (other,)
    ]

    dev.unsubscribe("PatientDetails", {"patient_id": p})
    assert local_keys(dev, "LocalAppointment") == set(agenda)
    dev.unsubscribe("DoctorAgenda", {"doctor_id": d})
    assert local_keys(dev, "LocalAppointment") == set()
    assert dev.store.query("SELECT count(*) FROM syncunit_holds") == [(0,)]


def test_another_hospitals_patient_gives_nothing_of_it(client, store):
    with store.write() as conn:
        conn.execute(patient.insert().values(id=9001, name="Elsewhere", phone="+351 900"))
        d2 = conn.execute(sa.select(doctor.c.id).where(doctor.c.hospital_id == 2)).scalars().first()
        conn.execute(
            appointment.insert().values(
                id="0190-elsewhere", doctor_id=d2, patient_id=9001,
                starts_at=dt.datetime(2030, 1, 1, 9), ends_at=dt.datetime(2030, 1, 1, 9, 15),
            )
        )  # fmt: skip
    result = client.sync("PatientDetails", params={"patient_id": 9001})
    assert result.total_in == 0
    assert local_keys(client, "LocalPatient") == set()
    assert local_keys(client, "LocalAppointment") == set()
    # A patient seen in both hospitals: only this hospital's appointments come.
    shared = next(p for p in patients_of(store, 1) if history(store, p, 2))
    client.sync("PatientDetails", params={"patient_id": shared})
    assert local_keys(client, "LocalAppointment") == set(history(store, shared, 1))


@pytest.mark.parametrize(
    ("params", "says"),
    [
        (None, "needs parameter 'patient_id'"),
        ({"patient_id": "42"}, "must be an integer"),
        ({"patient_id": 0}, "at least 1"),
        ({"patient_id": True}, "must be an integer"),
        ({"patient_id": 4, "doctor_id": 1}, "no parameter 'doctor_id'"),
    ],
)
def test_a_missing_or_malformed_parameter_is_a_400_problem(client, store, params, says):
    client.sync("Login")
    before_server = db_state(store.engine)
    before_local = local_keys(client, "LocalAppointment")
    with pytest.raises(ProblemError) as err:
        client.sync("PatientDetails", params=params)
    assert err.value.status == 400
    assert err.value.code == "invalid-parameter"
    assert says in str(err.value.detail)
    assert db_state(store.engine) == before_server
    assert local_keys(client, "LocalAppointment") == before_local
    assert local_keys(client, "LocalPatient") == set()
    assert client.subscriptions() == []  # a refused value is not held (nor sent by Online)


def test_an_integer_parameter_past_64_bits_is_a_422_problem(client, store):
    before = db_state(store.engine)
    with pytest.raises(ProblemError) as err:
        client.sync("PatientDetails", params={"patient_id": 2**63})
    assert (err.value.status, err.value.code) == (422, "invalid-request")
    assert "64 bits" in str(err.value.detail)
    assert db_state(store.engine) == before
    assert client.subscriptions() == []


@pytest.mark.parametrize(
    ("param", "value", "says"),
    [
        (Param("integer"), 2**63, "signed 64-bit"),
        (Param("integer", max=2**70), -(2**63) - 1, "signed 64-bit"),
        (Param("integer"), "9" * 100_000, "must be an integer"),
        (Param("text"), ["x" * 100_000], "must be text"),
        (Param("text"), "a\x00b", "NUL"),
    ],
)
def test_a_parameter_check_says_what_is_wrong_without_echoing_the_value(param, value, says):
    reason = param.check("p", value)
    assert reason is not None
    assert says in reason
    assert len(reason) < 200
    assert param.check("p", 7 if param.type == "integer" else "ok") is None


def test_a_unit_without_parameters_refuses_them(client):
    with pytest.raises(ProblemError) as err:
        client.sync("Login", params={"patient_id": 3})
    assert err.value.code == "invalid-parameter"


def test_cursors_of_different_values_never_mix(server, live, tapped, tap, store):
    a, b = patients_of(store, 1)[:2]
    tapped.sync("PatientDetails", params={"patient_id": a})
    cursor_a = tapped.store.subscription_cursors(
        subscription_id("PatientDetails", {"patient_id": a}), ["patient_history"]
    )["patient_history"]
    # Patient a's cursor sent with patient b: the server resets, and sends all of b.
    body = encode_request(
        SyncRequest(
            protocol=1,
            client_id="raw",
            cursors={"patient_history": cursor_a},
            params={"patient_id": b},
        )
    )
    r = httpx.post(
        f"{live.url}/v1/sync/PatientDetails",
        content=body,
        headers={"Authorization": "Bearer token-h1", "Content-Type": content_type("msgpack")},
    )
    assert r.status_code == 200
    frames = list(FrameDecoder("msgpack").feed(r.content))
    starts = [f for f in frames if isinstance(f, StreamStart) and f.stream == "patient_history"]
    assert starts[0].reset
    keys = sorted(
        k
        for f in frames
        if isinstance(f, Chunk) and f.stream == "patient_history" and f.row_count()
        for k in [r[f.columns.index("id")] for r in f.row_list()]
    )
    assert keys == history(store, b)


def test_a_subscription_survives_a_restart_and_online_refreshes_it(server, make_client, store):
    p = patients_of(store, 1)[0]
    dev = make_client(sync_on_reconnect="Online")
    dev.sync("Login")
    dev.sync("PatientDetails", params={"patient_id": p})
    dev.close()

    with store.write() as conn:
        conn.execute(patient.update().where(patient.c.id == p).values(phone="+351 111"))
    dev = make_client(sync_on_reconnect="Online")  # the same file, reopened
    assert dev.subscriptions() == [("PatientDetails", {"patient_id": p})]
    result = dev.sync("Online")
    assert result.requests == 1
    assert "patient_history" not in result.resets  # its signed cursor was honoured
    assert result.rows_in["LocalPatient"] == 1
    assert dev.store.query("SELECT phone FROM LocalPatient WHERE id = ?", (p,)) == [("+351 111",)]
    assert_subscription(server, dev, p)
    # Online moved the subscription's own cursors: opening the patient brings nothing.
    assert dev.sync("PatientDetails", params={"patient_id": p}).total_in == 0
    assert dev.store.cursors(["patient_card", "patient_history"]) == {}


def test_a_reset_refills_a_subscription_and_keeps_others(server, client, store):
    a, b = patients_of(store, 1)[:2]
    client.sync("PatientDetails", params={"patient_id": a})
    client.sync("PatientDetails", params={"patient_id": b})
    stale = history(store, a)[0]
    with store.write() as conn:  # the database is replaced: a's row is gone without a tombstone
        conn.execute(appointment.delete().where(appointment.c.id == stale))
        conn.execute(sa.text("DELETE FROM syncunit_tombstones"))
        store._set_fact(conn, "epoch", "another-database")

    result = client.sync("PatientDetails", params={"patient_id": a})
    assert "patient_history" in result.resets
    assert stale not in local_keys(client, "LocalAppointment")
    assert set(history(store, b)) <= local_keys(client, "LocalAppointment")
    assert local_keys(client, "LocalPatient") == {a, b}
    assert_subscription(server, client, a)
    client.sync("PatientDetails", params={"patient_id": b})
    assert_subscription(server, client, b)


def test_the_queue_keys_on_unit_and_parameters(client, store):
    a, b = patients_of(store, 1)[:2]
    client.scheduler.set_online(False)
    assert client.trigger("PatientDetails", params={"patient_id": a})
    assert not client.trigger("PatientDetails", params={"patient_id": a})
    assert client.trigger("PatientDetails", params={"patient_id": b})
    assert len(client.status.queued) == 2
    client.scheduler.set_online(True)
    deadline = time.monotonic() + 20
    while (client.status.queued or client.status.state != "idle") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert local_keys(client, "LocalPatient") == {a, b}


def test_time_to_live_drops_a_subscription_not_synced_for_long(make_client, store, clock):
    dev = make_client(clock=clock)
    a, b = patients_of(store, 1)[:2]
    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=60)
    dev.sync("PatientDetails", params={"patient_id": b})
    clock.advance(61)
    dev.sync("PatientDetails", params={"patient_id": b})  # a sync closes what expired
    assert dev.subscriptions() == [("PatientDetails", {"patient_id": b})]
    assert local_keys(dev, "LocalPatient") == {b}
    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=60)
    clock.advance(30)
    assert dev.expire_subscriptions() == []  # synced 30 s ago: kept
    clock.advance(31)
    assert dev.expire_subscriptions() == [subscription_id("PatientDetails", {"patient_id": a})]
    assert local_keys(dev, "LocalPatient") == {b}


def test_a_refresh_without_keep_for_keeps_the_one_set(make_client, store, clock):
    """A triggered run (a background refresh) says no ``keep_for``: the subscription
    still expires; ``math.inf`` is how the app holds it until it closes it."""
    events = Events()
    dev = make_client(clock=clock, **events.kwargs())
    a = patients_of(store, 1)[0]
    sub_a = subscription_id("PatientDetails", {"patient_id": a})
    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=60)

    dev.trigger("PatientDetails", params={"patient_id": a})
    events.wait(lambda: len(events.completed()) == 2)
    assert [s[4] for s in dev.store.subscriptions()] == [60]
    clock.advance(61)
    assert dev.expire_subscriptions() == [sub_a]

    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=60)
    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=math.inf)
    dev.sync("PatientDetails", params={"patient_id": a})
    clock.advance(10**6)
    assert dev.expire_subscriptions() == []
    assert dev.subscriptions() == [("PatientDetails", {"patient_id": a})]


def test_reconnect_drops_only_the_waiting_runs_online_does(make_client, store, clock, net):
    """Coming back online, Online's discard-pending drops Splash and the refresh of a
    held patient (Online refreshes it; the use the trigger meant is recorded, so its
    ``keep_for`` counts from it), not the opening of a patient not held yet: that run
    stays queued and runs, and its rows arrive."""
    events = Events()
    dev = make_client(transport=net, clock=clock, sync_on_reconnect="Online", **events.kwargs())
    a, b = patients_of(store, 1)[:2]
    dev.sync("Login")
    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=60)
    dev.set_online(False)
    clock.advance(50)
    assert dev.trigger("Splash")
    assert dev.trigger("PatientDetails", params={"patient_id": a})
    assert dev.trigger("PatientDetails", params={"patient_id": b})
    clock.advance(30)  # a was opened 80 s ago, and asked for 30 s ago
    net.units.clear()

    dev.set_online(True)

    events.wait(lambda: "Online" in events.completed())
    wait_until(lambda: idle(dev))
    assert net.units == ["PatientDetails", "Online"]  # b's run, queued first, then Online
    assert events.errors() == []
    assert dev.subscriptions() == [
        ("PatientDetails", {"patient_id": a}),
        ("PatientDetails", {"patient_id": b}),
    ]
    assert local_keys(dev, "LocalPatient") == {a, b}
    assert dev.store.last_sync_on("Splash") is None


def test_a_subscription_synced_offline_after_its_time_to_live_keeps_its_rows(
    make_client, store, clock, net
):
    """The clock jumped past ``keep_for`` and the device is offline: syncing that very
    subscription keeps it and its rows (the app is using it), the sync just fails."""
    dev = make_client(clock=clock, transport=net)
    a = patients_of(store, 1)[0]
    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=3600)
    clock.advance(2 * 86400)
    net.fail("offline")
    with pytest.raises(NetworkError):
        dev.sync("PatientDetails", params={"patient_id": a}, keep_for=3600)
    assert local_keys(dev, "LocalPatient") == {a}
    assert set(history(store, a)) <= local_keys(dev, "LocalAppointment")


def test_a_subscription_used_while_the_clock_was_ahead_expires_in_the_end(
    make_client, store, clock
):
    """Used at a time the clock has stepped back from: it counts as used now, and
    expires ``keep_for`` later, not once the clock catches up years later."""
    dev = make_client(clock=clock)
    a = patients_of(store, 1)[0]
    clock.advance(10**9)  # decades ahead
    dev.sync("PatientDetails", params={"patient_id": a}, keep_for=60)
    clock.advance(-(10**9))  # corrected
    assert dev.expire_subscriptions() == []
    clock.advance(61)
    assert dev.expire_subscriptions() == [subscription_id("PatientDetails", {"patient_id": a})]


@pytest.mark.parametrize(
    ("params", "keep_for", "error"),
    [
        ({"patient_id": 2**70}, None, RequestRejected),
        ({"patient_id": -(2**63) - 1}, None, RequestRejected),
        ({"patient_id": b"13"}, None, RequestRejected),
        ({"patient_id": 13}, "1 day", ValueError),
        ({"patient_id": 13}, -5, ValueError),
        ({"patient_id": 13}, math.nan, ValueError),
    ],
    ids=[
        "past-64-bits",
        "below-64-bits",
        "bytes",
        "keep-for-text",
        "keep-for-negative",
        "keep-for-nan",
    ],
)
def test_a_subscription_no_request_can_carry_is_refused_before_it_is_recorded(
    make_client, store, params, keep_for, error
):
    """Refused at once, with nothing recorded: a recorded one went with every later
    refresh (Online), which then failed for good."""
    dev = make_client(sync_on_reconnect="Online")
    dev.sync("Login")
    before = list(dev.store.conn.iterdump())
    with pytest.raises(error):
        dev.sync("PatientDetails", params=params, keep_for=keep_for)
    if error is RequestRejected:  # trigger takes no keep_for
        with pytest.raises(error):
            dev.trigger("PatientDetails", params=params)
    assert dev.subscriptions() == []
    assert list(dev.store.conn.iterdump()) == before
    dev.sync("Online")
    dev.sync("Login")


def test_authorize_hook_refuses_with_403(server, make_server, serve, make_client, store):
    guarded = Stream(
        "guarded",
        appointment,
        appointment_columns,
        joins=appointment_joins,
        where=sa.and_(
            doctor.c.hospital_id == my_hospital,
            appointment.c.patient_id == sa.bindparam("patient_id"),
        ),
        local_table="LocalAppointment",
        client_params=patient_param,
        authorize=lambda principal, params: params["patient_id"] != 13,
    )
    schema = SyncSchema([*hospital_schema.units.values(), SyncUnit("Guarded", [guarded])])
    dev = make_client(url=serve(make_server(schema).app).url)
    with pytest.raises(ProblemError) as err:
        dev.sync("Guarded", params={"patient_id": 13})
    assert err.value.status == 403
    dev.sync("Guarded", params={"patient_id": 12})


def test_declarations_keep_client_parameters_inside_the_principals_scope():
    with pytest.raises(DeclarationError, match="principal parameter"):
        Stream(
            "open",
            patient,
            [patient.c.id, patient.c.name],
            where=patient.c.id == sa.bindparam("patient_id"),
            client_params=patient_param,
        )
    with pytest.raises(DeclarationError, match="not used by the filter"):
        Stream(
            "unused",
            appointment,
            appointment_columns,
            joins=appointment_joins,
            where=doctor.c.hospital_id == my_hospital,
            client_params=patient_param,
        )
    with pytest.raises(DeclarationError, match="differ"):
        SyncSchema(
            [
                *hospital_schema.units.values(),
                SyncUnit(
                    "Odd",
                    [
                        Stream(
                            "odd",
                            appointment,
                            [appointment.c.id, appointment.c.notes],
                            joins=appointment_joins,
                            where=sa.and_(
                                doctor.c.hospital_id == my_hospital,
                                appointment.c.patient_id == sa.bindparam("patient_id"),
                            ),
                            local_table="LocalAppointment",
                            client_params=patient_param,
                        )
                    ],
                ),
            ]
        )


def _doctor_units() -> SyncSchema:
    """A unit whose one stream takes the client parameter ``doctor_id`` (a colleague of
    the same hospital) while another filters on the principal's own ``doctor_id``."""
    mine = Stream(
        "my_appointments",
        appointment,
        appointment_columns,
        joins=appointment_joins,
        where=appointment.c.doctor_id == sa.bindparam("doctor_id"),
        local_table="LocalMine",
    )
    agenda = Stream(
        "colleague_agenda",
        appointment,
        appointment_columns,
        joins=appointment_joins,
        where=sa.and_(
            doctor.c.hospital_id == my_hospital,
            appointment.c.doctor_id == sa.bindparam("doctor_id"),
        ),
        local_table="LocalAgenda",
        client_params={"doctor_id": Param("integer", min=1)},
    )
    return SyncSchema([SyncUnit("DoctorPage", [mine, agenda])])


def test_a_client_parameter_never_replaces_the_principals_own(store, serve, make_client):
    """Each stream reads the principal's parameters plus the client parameters it
    declares itself: a colleague's ``doctor_id`` chosen for one stream is not the
    signed-in doctor's for the other, in a sync, a live poll or an RxDB pull."""
    principals: dict[str, Principal] = {}
    server = SyncServer(_doctor_units(), store, authenticate=TokenAuth(principals.get))
    generate(store.engine, appointments=200, hospitals=2, doctors=6, patients=30)
    with store.engine.connect() as conn:
        doctors = conn.execute(sa.select(doctor.c.id, doctor.c.hospital_id)).all()
    me, colleague = [d for d, h in doctors if h == 1][:2]
    stranger = next(d for d, h in doctors if h == 2)
    principals["doc"] = Principal("doc", {"hospital_id": 1, "doctor_id": me})
    url = serve(server.app).url
    dev = make_client("doc", url=url)

    def appointments_by_doctor(doctor_id: int) -> set[Any]:
        with store.engine.connect() as conn:
            query = sa.select(appointment.c.id).where(appointment.c.doctor_id == doctor_id)
            return set(conn.execute(query).scalars())

    def mine() -> set[Any]:
        return appointments_by_doctor(me)

    dev.sync("DoctorPage", params={"doctor_id": stranger})  # of another hospital
    assert local_keys(dev, "LocalMine") == mine()
    assert local_keys(dev, "LocalAgenda") == set()  # narrowed by the principal's hospital
    dev.sync("DoctorPage", params={"doctor_id": colleague})
    assert local_keys(dev, "LocalMine") == mine()
    assert local_keys(dev, "LocalAgenda") == appointments_by_doctor(colleague)

    # A live poll reads each stream in the same scope: the stranger's changes are no news.
    sub = subscription_id("DoctorPage", {"doctor_id": stranger})
    dev.sync("DoctorPage", params={"doctor_id": stranger})
    # The plain stream keeps its cursor under its own name; the other under the subscription.
    cursors = {**dev.store.cursors(["my_appointments"]),
               **dev.store.subscription_cursors(sub, ["colleague_agenda"])}  # fmt: skip
    body = encode_request(
        SyncRequest(
            protocol=PROTOCOL_VERSION,
            client_id="raw",
            params={"doctor_id": stranger},
            cursors=cursors,
        )
    )
    headers = {"Authorization": "Bearer doc", "Content-Type": content_type("msgpack")}

    def changed() -> bool:
        r = httpx.post(f"{url}/v1/live/DoctorPage?wait=0", content=body, headers=headers)
        assert r.status_code == 200, r.text
        return bool(r.json()["changed"])

    assert set(cursors) == {"my_appointments", "colleague_agenda"}
    assert not changed()
    touch = appointment.update().values(notes="moved")
    with store.write() as conn:
        conn.execute(touch.where(appointment.c.doctor_id == stranger))
    assert not changed()
    with store.write() as conn:
        conn.execute(touch.where(appointment.c.doctor_id == me))
    assert changed()

    # RxDB: the stream that declares no client parameter reads the principal's value.
    r = httpx.post(
        f"{url}/v1/rxdb/DoctorPage/my_appointments/pull",
        params={"params": json.dumps({"doctor_id": stranger})},
        json={"checkpoint": None, "batchSize": 1000},
        headers={"Authorization": "Bearer doc"},
    )
    assert r.status_code == 200, r.text
    assert {d["id"] for d in r.json()["documents"]} == {str(k) for k in mine()}


def test_a_stream_reads_only_its_own_client_parameters():
    mine, agenda = _doctor_units().units["DoctorPage"].streams
    ana = Principal("ana", {"hospital_id": 1, "doctor_id": 3})
    assert ana.scope(mine, {"doctor_id": 9}) == {"hospital_id": 1, "doctor_id": 3}
    assert ana.scope(agenda, {"doctor_id": 9}) == {"hospital_id": 1, "doctor_id": 9}
    # A declared client parameter is never read from the principal, even when missing.
    assert ana.scope(agenda) == {"hospital_id": 1}


def test_the_catalog_lists_the_parameters(client):
    catalog = client.catalog(refresh=True)
    card = catalog.stream("patient_card")
    assert card is not None
    assert [(p.name, p.type, p.min) for p in card.params] == [("patient_id", "integer", 1)]
    login = catalog.stream("appointments")
    assert login is not None
    assert login.params == []


def test_a_live_change_to_an_open_patient_refreshes_it(server, make_client, store, monkeypatch):
    from syncunit.client import live as client_live

    defaults = dict(client_live.LiveWatcher.__init__.__kwdefaults__)
    defaults["wait"] = 0.3
    monkeypatch.setattr(client_live.LiveWatcher.__init__, "__kwdefaults__", defaults)
    p = patients_of(store, 1)[0]
    dev = make_client()
    dev.sync("Splash")
    dev.sync("PatientDetails", params={"patient_id": p})
    dev.watch("Splash")  # Splash alone would not see a phone number change
    wait_until(lambda: dev._live is not None and dev._live.polls >= 1)

    with store.write() as conn:
        conn.execute(patient.update().where(patient.c.id == p).values(phone="+351 222"))

    wait_until(
        lambda: (
            dev.store.query("SELECT phone FROM LocalPatient WHERE id = ?", (p,)) == [("+351 222",)]
        )
    )


@pytest.mark.parametrize("chunk", [16, 1000], ids=["beside-the-old-copy", "in-one-chunk"])
def test_a_login_reset_keeps_the_rows_an_open_patient_holds(
    server, make_client, store, in_sync, chunk
):
    client = make_client(chunk_size=chunk)
    client.sync("Login")
    a = patients_of(store, 1)[0]
    client.sync("PatientDetails", params={"patient_id": a})
    stale = history(store, a)[0]
    with store.write() as conn:  # the database is replaced: a's row is gone without a tombstone
        conn.execute(appointment.delete().where(appointment.c.id == stale))
        conn.execute(sa.text("DELETE FROM syncunit_tombstones"))
        store._set_fact(conn, "epoch", "another-database")

    login = client.sync("Login")
    assert "appointments" in login.resets
    # Login let go of every row; the patient still holds its own, the stale one too.
    assert set(history(store, a)) | {stale} <= local_keys(client, "LocalAppointment")
    patient_run = client.sync("PatientDetails", params={"patient_id": a})
    assert "patient_history" in patient_run.resets
    assert stale not in local_keys(client, "LocalAppointment")
    in_sync(client)
    assert_subscription(server, client, a)
    # The patient closed: its rows stay, Login holds them again.
    client.unsubscribe("PatientDetails", {"patient_id": a})
    in_sync(client)


def test_the_cli_syncs_a_unit_with_parameters(server, live, store, tmp_path, capsys):
    from syncunit.cli import main

    p = patients_of(store, 1)[0]
    argv = ["sync", live.url, "PatientDetails", "--db", str(tmp_path / "cli.sqlite")]
    argv += ["--token", "token-h1", "--json", "--param", f"patient_id={p}"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit"] == subscription_id("PatientDetails", {"patient_id": p})
    assert out["rows_in"]["LocalPatient"] == 1
    assert main([*argv[:-1], "patient_id=abc"]) == 1
    assert "must be an integer" in capsys.readouterr().err


def test_a_rebuilt_local_table_keeps_its_rows_and_holds(server, client, store, in_sync):
    import msgspec

    client.sync("Login")
    p = patients_of(store, 1)[0]
    client.sync("PatientDetails", params={"patient_id": p})
    sub = subscription_id("PatientDetails", {"patient_id": p})
    held = "SELECT local_table, count(*) FROM syncunit_holds GROUP BY local_table"
    before = client.store.query(held)
    rows = local_keys(client, "LocalAppointment")
    catalog = client.catalog()

    def retyped(s):  # a changed column type rebuilds the table (create, copy, swap)
        if s.local_table != "LocalAppointment":
            return s
        cols = [
            msgspec.structs.replace(c, type="integer") if c.name == "room" else c for c in s.columns
        ]
        return msgspec.structs.replace(s, columns=cols, definition=s.definition + "x")

    changes = client.store.apply_catalog(
        msgspec.structs.replace(catalog, streams=[retyped(s) for s in catalog.streams])
    )
    assert any(c.startswith("rebuilt LocalAppointment") for c in changes)
    assert local_keys(client, "LocalAppointment") == rows
    assert client.store.query(held) == before
    assert client.store.subscription_cursors(sub, ["patient_history"])
    client.store.apply_catalog(catalog)
    client.unsubscribe("PatientDetails", {"patient_id": p})
    assert local_keys(client, "LocalAppointment") == rows  # Login holds them all
    in_sync(client)


def test_logout_forgets_the_subscriptions(server, client, store):
    p = patients_of(store, 1)[0]
    client.sync("PatientDetails", params={"patient_id": p})
    client.logout(clear=True)
    assert client.subscriptions() == []
    assert client.store.query("SELECT count(*) FROM syncunit_holds") == [(0,)]
    assert local_keys(client, "LocalPatient") == set()


# A plain stream narrower than a subscription's: booked appointments only.
agenda = Stream(
    "agenda",
    appointment,
    appointment_columns,
    joins=appointment_joins,
    where=sa.and_(doctor.c.hospital_id == my_hospital, appointment.c.status == "booked"),
    local_table="LocalAppointment",
)
full_history = Stream(
    "full_history",
    appointment,
    appointment_columns,
    joins=appointment_joins,
    where=sa.and_(
        doctor.c.hospital_id == my_hospital, appointment.c.patient_id == sa.bindparam("patient_id")
    ),
    local_table="LocalAppointment",
    client_params=patient_param,
)
narrow_schema = SyncSchema([SyncUnit("Agenda", [agenda]), SyncUnit("History", [full_history])])


@pytest.mark.parametrize("chunk", [4, 1000], ids=["beside-the-old-copy", "in-one-chunk"])
def test_a_plain_stream_keeps_off_the_rows_only_a_subscription_holds(
    server, make_server, serve, make_client, store, chunk
):
    dev = make_client(url=serve(make_server(narrow_schema).app).url, chunk_size=chunk)
    p = patients_of(store, 1)[0]
    cancelled, both = history(store, p)[:2]
    with store.write() as conn:
        conn.execute(
            appointment.update().where(appointment.c.id == cancelled).values(status="cancelled")
        )
    dev.sync("History", params={"patient_id": p})  # first: the agenda's copy must mark its hold
    dev.sync("Agenda")
    assert {cancelled, both} <= local_keys(dev, "LocalAppointment")
    with store.write() as conn:  # another database: the agenda starts over
        store._set_fact(conn, "epoch", "another-database")
    assert "agenda" in dev.sync("Agenda").resets
    assert cancelled in local_keys(dev, "LocalAppointment")  # only the patient holds it
    with store.write() as conn:  # booked again: the agenda's delta brings it, and holds it
        conn.execute(
            appointment.update().where(appointment.c.id == cancelled).values(status="booked")
        )
    assert dev.sync("Agenda").resets == []
    dev.unsubscribe("History", {"patient_id": p})
    assert {cancelled, both} <= local_keys(dev, "LocalAppointment")


def test_closing_drops_the_rows_only_the_subscription_held(
    server, make_server, serve, make_client, store
):
    dev = make_client(url=serve(make_server(narrow_schema).app).url)
    p = patients_of(store, 1)[0]
    cancelled = history(store, p)[0]
    with store.write() as conn:
        conn.execute(
            appointment.update().where(appointment.c.id == cancelled).values(status="cancelled")
        )
    dev.sync("Agenda")
    dev.sync("History", params={"patient_id": p})
    assert cancelled in local_keys(dev, "LocalAppointment")
    dev.unsubscribe("History", {"patient_id": p})
    keys = local_keys(dev, "LocalAppointment")
    assert cancelled not in keys
    assert set(history(store, p)[1:]) <= keys  # the agenda holds them


def test_a_subscription_reset_split_across_responses_keeps_its_rows_until_it_completes(
    make_server, serve, store, make_client, tap
):
    """A subscription copied afresh (here after the database changed under it) over
    several responses: the app keeps every row it held until the copy completes,
    then holds exactly what the stream selects."""
    from syncunit.protocol import End
    from syncunit.server.limits import Limits
    from tests.conftest import SIZE
    from tests.support import chunks

    limits = Limits(response_chunks=2, requests_per_second=1e6, request_burst=10**6)
    server = make_server(limits=limits)
    generate(store.engine, **SIZE)
    live = serve(server.app)
    device = make_client(url=live.url, transport=tap, chunk_size=1)
    a = patients_of(store, 1)[0]
    device.sync("PatientDetails", params={"patient_id": a})
    before = local_keys(device, "LocalAppointment")
    assert len(history(store, a)) > 3
    gone = history(store, a)[-1]
    with store.write() as conn:  # another database: a row is missing, without a tombstone
        conn.execute(appointment.delete().where(appointment.c.id == gone))
        conn.execute(sa.text("DELETE FROM syncunit_tombstones"))
        store._set_fact(conn, "epoch", "another-database")
    seen: list[set[object]] = []

    def at_each_early_end(frame: object) -> None:
        if isinstance(frame, End) and not frame.complete:
            seen.append(local_keys(device, "LocalAppointment"))

    tap.responses.clear()
    tap.on_frame = at_each_early_end

    result = device.sync("PatientDetails", params={"patient_id": a})

    assert "patient_history" in result.resets
    assert len(seen) > 2  # the copy took several responses
    assert all(before - {gone} <= keys for keys in seen)  # none went mid-way
    assert [c.reset for r in tap.responses for c in chunks(r, "patient_history")].count(True) == 1
    assert gone not in local_keys(device, "LocalAppointment")
    assert local_keys(device, "LocalAppointment") == set(history(store, a))
    assert_subscription(server, device, a)


def test_closing_a_subscription_mid_copy_drops_every_row_it_held(
    server, make_client, live, tap, store
):
    """Cut during its fresh copy, a subscription still holds its old rows (set aside
    until the copy completes); closing it then releases them too."""
    from syncunit.errors import NetworkError

    device = make_client(url=live.url, transport=tap, chunk_size=2)
    a = patients_of(store, 1)[0]
    device.sync("PatientDetails", params={"patient_id": a})
    assert len(history(store, a)) > 4
    with store.write() as conn:  # another database: the subscription is copied afresh
        store._set_fact(conn, "epoch", "another-database")
    tap.arm(chunks=("patient_history", 1))
    with pytest.raises(NetworkError):
        device.sync("PatientDetails", params={"patient_id": a})
    assert local_keys(device, "LocalAppointment") == set(history(store, a))  # none went

    device.unsubscribe("PatientDetails", {"patient_id": a})

    assert local_keys(device, "LocalAppointment") == set()
    assert device.store.query("SELECT count(*) FROM syncunit_holds") == [(0,)]


def open_patients(dev: Any, store: Any, count: int) -> list[int]:
    """Open PatientDetails for ``count`` patients of hospital 1 on ``dev``."""
    opened = patients_of(store, 1)[:count]
    assert len(opened) == count
    for p in opened:
        dev.sync("PatientDetails", params={"patient_id": p})
    return opened


def new_phones(store: Any, patients: list[int], prefix: str) -> dict[int, str]:
    """Give each patient a new phone number on the server; return them."""
    phones = {p: f"{prefix} {p:05d}" for p in patients}
    with store.write() as conn:
        for p, phone in phones.items():
            conn.execute(patient.update().where(patient.c.id == p).values(phone=phone))
    return phones


def assert_phones(server: Any, dev: Any, phones: dict[int, str]) -> None:
    for p, phone in phones.items():
        assert dev.store.query("SELECT phone FROM LocalPatient WHERE id = ?", (p,)) == [(phone,)]
        assert_subscription(server, dev, p)


def test_more_subscriptions_than_a_request_may_carry_refresh_in_one_run(server, make_client, store):
    server.max_subscriptions = 3  # what the server says in every answer's Push-Limits
    dev = make_client(sync_on_reconnect="Online")
    dev.sync("Login")
    assert dev.push_limits is not None
    assert dev.push_limits.subscriptions == 3
    opened = open_patients(dev, store, 7)
    phones = new_phones(store, opened, "+351 1")

    result = dev.sync("Online")  # not refused: the 7 go 3, 3 and 1 to a request
    assert result.requests == 3
    assert result.rows_in["LocalPatient"] == 7
    assert_phones(server, dev, phones)
    # Every subscription's cursors moved: opening each patient brings nothing.
    for p in opened:
        assert dev.sync("PatientDetails", params={"patient_id": p}).total_in == 0

    for p in opened[3:]:  # as many as one request carries: one request, as always
        dev.unsubscribe("PatientDetails", {"patient_id": p})
    phones = new_phones(store, opened[:3], "+351 2")
    result = dev.sync("Online")
    assert result.requests == 1
    assert result.rows_in["LocalPatient"] == 3
    assert_phones(server, dev, phones)


def test_a_push_unit_that_refreshes_subscriptions_is_one_request(server, make_client, store):
    """A push-only unit reads no stream: the subscriptions it is to refresh do not go
    with it, and its sync ends after its one request."""
    dev = make_client(sync_on_reconnect="SendAppointments")
    dev.sync("Login")
    open_patients(dev, store, 2)
    key = dev.store.query("SELECT id FROM LocalAppointment ORDER BY id LIMIT 1")[0][0]
    dev.update("LocalAppointment", key, {"notes": "edited"})

    result = dev.sync("SendAppointments")

    assert (result.requests, result.applied) == (1, 1)


def test_a_bound_lowered_since_the_device_learnt_it_is_followed(server, make_client, store):
    server.max_subscriptions = 3
    dev = make_client(sync_on_reconnect="Online")
    dev.sync("Login")
    opened = open_patients(dev, store, 7)
    server.max_subscriptions = 2  # the device still believes 3
    phones = new_phones(store, opened, "+351 1")

    result = dev.sync("Online")  # refused once (422, saying 2), then 2, 2, 2 and 1
    assert result.requests == 5
    assert dev.push_limits is not None
    assert dev.push_limits.subscriptions == 2
    assert result.rows_in["LocalPatient"] == 7
    assert_phones(server, dev, phones)
    phones = new_phones(store, opened, "+351 2")
    assert dev.sync("Online").requests == 4  # no refusal again
    assert_phones(server, dev, phones)


def test_live_changes_of_more_subscriptions_than_a_request_may_carry(
    server, make_client, store, monkeypatch
):
    from syncunit.client import live as client_live

    defaults = dict(client_live.LiveWatcher.__init__.__kwdefaults__)
    defaults["wait"] = 0.3
    monkeypatch.setattr(client_live.LiveWatcher.__init__, "__kwdefaults__", defaults)
    server.max_subscriptions = 2
    dev = make_client()
    dev.sync("Splash")
    opened = open_patients(dev, store, 5)
    dev.watch("Splash")  # its polls ask about the 5, two at a time
    wait_until(lambda: dev._live is not None and dev._live.polls >= 3)

    last = opened[-1]
    new_phones(store, [last], "+351 3")
    wait_until(
        lambda: (
            dev.store.query("SELECT phone FROM LocalPatient WHERE id = ?", (last,))
            == [(f"+351 3 {last:05d}",)]
        )
    )
    assert dev._live is not None
    assert dev._live.errors == 0


# -- a redeploy that changes what a held subscription names ---------------------------------


def redeployed(history_unit: str | None) -> SyncSchema:
    """``narrow_schema`` deployed again with History renamed (or removed: None)."""
    units = [SyncUnit("Agenda", [agenda])]
    if history_unit is not None:
        units.append(SyncUnit(history_unit, [full_history]))
    return SyncSchema(units)


def open_history(dev: Any, store: Any) -> tuple[int, str]:
    """Agenda synced and one patient's History open; returns the patient and an
    appointment of theirs only the subscription holds (cancelled: not the agenda's)."""
    p = patients_of(store, 1)[0]
    cancelled = history(store, p)[0]
    with store.write() as conn:
        conn.execute(
            appointment.update().where(appointment.c.id == cancelled).values(status="cancelled")
        )
    dev.sync("Agenda")
    dev.sync("History", params={"patient_id": p})
    assert cancelled in local_keys(dev, "LocalAppointment")
    return p, cancelled


@pytest.mark.parametrize("renamed", ["PatientHistory", None], ids=["renamed", "removed"])
def test_a_held_subscription_whose_unit_is_gone_is_closed_and_the_run_goes_on(
    server, make_server, serve, make_client, store, renamed
):
    live = serve(make_server(narrow_schema).app)
    errors: list[tuple[str, Exception]] = []
    dev = make_client(
        url=live.url,
        refresh_subscriptions_with=["Agenda"],
        on_error=lambda u, e: errors.append((u, e)),
    )
    p, cancelled = open_history(dev, store)
    sub = subscription_id("History", {"patient_id": p})
    v2 = make_server(redeployed(renamed))
    live.app = v2.app  # the device still holds the old catalog, and History open

    result = dev.sync("Agenda")

    assert result.requests == 2  # refused whole, naming it; then again without it
    assert dev.subscriptions() == []
    assert [(u, e.code) for u, e in errors] == [(sub, "invalid-request")]  # type: ignore[attr-defined]
    assert errors[0][1].extra["subscription"] == sub  # type: ignore[attr-defined]
    assert dev.store.catalog().schema_hash == v2.catalog.schema_hash
    keys = local_keys(dev, "LocalAppointment")
    assert cancelled not in keys  # it alone held it
    assert set(history(store, p)[1:]) <= keys  # the agenda holds them
    assert dev.store.query("SELECT count(*) FROM syncunit_holds") == [(0,)]


def test_a_fresh_catalog_closes_the_subscriptions_of_units_it_no_longer_has(
    server, make_server, serve, make_client, store
):
    live = serve(make_server(narrow_schema).app)
    dev = make_client(url=live.url, refresh_subscriptions_with=["Agenda"])
    p, cancelled = open_history(dev, store)
    sub = subscription_id("History", {"patient_id": p})
    live.app = make_server(redeployed("PatientHistory")).app

    dev.catalog(refresh=True)  # the new catalog, before any sync

    assert dev.subscriptions() == []
    assert cancelled not in local_keys(dev, "LocalAppointment")
    assert dev.store.query("SELECT count(*) FROM syncunit_holds") == [(0,)]
    assert dev.store.subscription_cursors(sub, ["full_history"]) == {}
    with store.write() as conn:  # gone on the server meanwhile: nothing keeps it locally
        conn.execute(appointment.delete().where(appointment.c.id == cancelled))
    dev.sync("Agenda")
    dev.sync("PatientHistory", params={"patient_id": p})  # opened again under its new name
    assert local_keys(dev, "LocalAppointment") >= set(history(store, p))
    assert cancelled not in local_keys(dev, "LocalAppointment")


@pytest.mark.parametrize("via", ["sync", "catalog"])
def test_a_subscription_a_catalog_closes_is_reported_to_on_error(
    server, make_server, serve, make_client, store, via
):
    # A rolling deploy: the device opened History on a process that has it; its next
    # request (not carrying History) lands on one that does not, whose catalog it applies.
    live = serve(make_server(narrow_schema).app)
    errors: list[tuple[str, Exception]] = []
    dev = make_client(url=live.url, on_error=lambda u, e: errors.append((u, e)))
    p, cancelled = open_history(dev, store)
    sub = subscription_id("History", {"patient_id": p})
    live.app = make_server(redeployed(None)).app

    if via == "sync":
        result = dev.sync("Agenda")
        assert result.closed == [sub]
    else:
        dev.catalog(refresh=True)

    assert dev.subscriptions() == []
    assert cancelled not in local_keys(dev, "LocalAppointment")
    assert len(errors) == 1
    named, exc = errors[0]
    assert named == sub
    assert isinstance(exc, UnknownUnitError)
    assert exc.code == "unknown-unit"
    assert exc.extra == {"subscription": sub, "unit": "History", "params": {"patient_id": p}}
    assert "sync the unit again to reopen it" in str(exc)
    # The app reopens it with what the report carries, on a process that has the unit.
    live.app = make_server(narrow_schema).app
    dev.sync(exc.extra["unit"], params=exc.extra["params"])
    assert cancelled in local_keys(dev, "LocalAppointment")
    assert len(errors) == 1


def test_a_held_subscription_a_stricter_hook_refuses_is_closed_and_online_pushes(
    server, make_server, serve, make_client, store
):
    live = serve(make_server().app)
    errors: list[tuple[str, Exception]] = []
    dev = make_client(
        url=live.url, sync_on_reconnect="Online", on_error=lambda u, e: errors.append((u, e))
    )
    a = patients_of(store, 1)[0]
    dev.sync("Online")
    dev.sync("PatientDetails", params={"patient_id": a})
    changed = sorted(local_keys(dev, "LocalAppointment") - set(history(store, a)))[0]
    dev.update("LocalAppointment", changed, {"notes": "pushed after the redeploy"})
    # Redeployed with a hook on the patient's history: this patient may no longer be
    # opened (no definition changed: the schema hash stays).
    guarded = Stream(
        "patient_history",
        appointment,
        appointment_columns,
        joins=appointment_joins,
        where=sa.and_(
            doctor.c.hospital_id == my_hospital,
            appointment.c.patient_id == sa.bindparam("patient_id"),
        ),
        local_table="LocalAppointment",
        client_params=patient_param,
        authorize=lambda principal, params: params["patient_id"] != a,
    )
    units = dict(hospital_schema.units)
    units["PatientDetails"] = SyncUnit("PatientDetails", [guarded, hospital_units.patient_card])
    v2 = make_server(SyncSchema(list(units.values())))
    assert v2.catalog.schema_hash == dev.store.catalog().schema_hash
    live.app = v2.app

    result = dev.sync("Online")

    assert result.requests == 2
    assert result.applied == 1
    with store.engine.connect() as conn:
        notes = conn.execute(sa.select(appointment.c.notes).where(appointment.c.id == changed))
        assert notes.scalar_one() == "pushed after the redeploy"
    sub = subscription_id("PatientDetails", {"patient_id": a})
    assert dev.subscriptions() == []
    assert [(u, e.status, e.code) for u, e in errors] == [(sub, 403, "forbidden")]  # type: ignore[attr-defined]
    assert errors[0][1].extra["subscription"] == sub  # type: ignore[attr-defined]
    assert local_keys(dev, "LocalPatient") == set()
    assert dev.sync("Online").requests == 1


def test_a_live_poll_refused_for_a_held_subscription_closes_it_and_polls_on(
    server, make_server, serve, make_client, store, monkeypatch
):
    from syncunit.client import live as client_live
    from tests.support import wait_until

    defaults = dict(client_live.LiveWatcher.__init__.__kwdefaults__)
    defaults["wait"] = 0.3
    monkeypatch.setattr(client_live.LiveWatcher.__init__, "__kwdefaults__", defaults)
    live = serve(make_server(narrow_schema).app)
    errors: list[tuple[str, Exception]] = []
    dev = make_client(url=live.url, on_error=lambda u, e: errors.append((u, e)))
    p, cancelled = open_history(dev, store)
    live.app = make_server(redeployed(None)).app

    dev.watch("Agenda")  # its polls carry the held History subscription

    wait_until(lambda: dev.subscriptions() == [])
    sub = subscription_id("History", {"patient_id": p})
    assert [(u, e.code) for u, e in errors] == [(sub, "invalid-request")]  # type: ignore[attr-defined]
    assert cancelled not in local_keys(dev, "LocalAppointment")
    polls = dev._live.polls
    wait_until(lambda: dev._live.polls > polls + 1)  # polled on, without it
    assert dev._live.errors == 0  # not a failure: handled as a sync handles it
