"""Write authorization, over the real HTTP app with the hospital example.

A unit pushes only the streams it declares writable; a stream with no row
filter is read-only unless it declares a write rule; the write scope is checked
before any business rule, so a rejection never describes rows outside it; pushed
rows keep referential integrity.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from hospital.models import appointment, doctor, hospital, specialty
from hospital.units import appointment_columns, appointment_joins, my_hospital, summary
from hospital.units import appointments as appointments_stream

from syncunit.errors import DeclarationError
from syncunit.protocol import Mutation
from syncunit.units import Join, Stream, SyncSchema, SyncUnit
from tests.support import appointments_of, db_state, doctors_of
from tests.test_push_support import post_sync, push_results


def _doctor(store: Any, key: int) -> dict[str, Any]:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(doctor).where(doctor.c.id == key)).mappings().one()
    return dict(row)


def _mutation(seq: int, table: str, key: Any, op: str = "update", **values: Any) -> Mutation:
    return Mutation(
        seq=seq, id=f"m{seq}", table=table, key=key, op=op,  # type: ignore[arg-type]
        values=values, changed=list(values) if op == "update" else [],
    )  # fmt: skip


@pytest.mark.parametrize("unit", ["SendAppointments", "Online"])
def test_a_device_cannot_move_or_delete_another_hospitals_doctor(server, live, store, unit):
    other = doctors_of(store, 2)[0]
    before = _doctor(store, other)

    moved = post_sync(
        live.url, unit, token="token-h1", client_id="evil",
        mutations=[_mutation(1, "LocalDoctor", other, hospital_id=1)],
    )  # fmt: skip
    deleted = post_sync(
        live.url, unit, token="token-h1", client_id="evil",
        mutations=[_mutation(2, "LocalDoctor", other, op="delete")],
    )  # fmt: skip

    for response in (moved, deleted):
        (result,) = push_results(response).results
        assert result.status == "rejected"
        assert result.code == "read-only-table"
    after = _doctor(store, other)
    assert after == before
    assert len(appointments_of(store, 2, other)) > 0  # its appointments stay in hospital 2


def test_the_catalog_offers_no_push_of_read_only_streams(server):
    units = {u.name: u for u in server.catalog.units}
    assert units["Online"].push == ["LocalAppointment"]
    doctors = server.catalog.stream("doctors")
    assert doctors is not None
    assert not any(c.writable for c in doctors.columns)


def test_a_stream_without_row_filter_needs_an_explicit_write_rule():
    cols = {"id": doctor.c.id, "name": doctor.c.name}
    with pytest.raises(DeclarationError, match="write=<clause>"):
        Stream("d1", doctor, cols, write=True)
    ro = Stream("d2", doctor, cols)
    assert not ro.is_writable
    with pytest.raises(DeclarationError, match="read-only"):
        SyncSchema([SyncUnit("P", [ro], direction="push", push_tables=["d2"])])
    assert SyncSchema([SyncUnit("P", [ro], direction="both")]).catalog().units[0].push == []


def _writable_doctors_schema() -> SyncSchema:
    doctors = Stream(
        "doctors",
        doctor,
        {"id": doctor.c.id, "name": doctor.c.name, "hospital_id": doctor.c.hospital_id,
         "specialty": specialty.c.name, "hospital": hospital.c.name},
        joins=[Join(specialty, doctor.c.specialty_id == specialty.c.id),
               Join(hospital, doctor.c.hospital_id == hospital.c.id)],
        local_table="LocalDoctor",
        write=doctor.c.hospital_id == my_hospital,
    )  # fmt: skip
    return SyncSchema(
        [
            SyncUnit("Staff", [summary, doctors, appointments_stream], direction="both"),
            SyncUnit("Book", [appointments_stream], direction="push"),
        ]
    )


def test_an_explicit_write_rule_bounds_writes_before_and_after(make_server, serve, store):
    from hospital.generate import generate

    server = make_server(_writable_doctors_schema())
    generate(store.engine, appointments=40, hospitals=2, doctors=6, patients=20)
    live = serve(server.app)
    mine, theirs = doctors_of(store, 1)[0], doctors_of(store, 2)[0]

    r = post_sync(
        live.url, "Staff", token="token-h1", client_id="desk",
        mutations=[
            _mutation(1, "LocalDoctor", mine, name="Dr. Renamed"),
            _mutation(2, "LocalDoctor", theirs, name="Dr. Stolen"),
            _mutation(3, "LocalDoctor", mine, hospital_id=2),
            _mutation(4, "LocalDoctor", theirs, hospital_id=1),
        ],
    )  # fmt: skip
    results = push_results(r).results
    assert [x.status for x in results] == ["applied", "rejected", "rejected", "rejected"]
    assert {x.code for x in results[1:]} == {"out-of-scope"}
    assert _doctor(store, mine)["name"] == "Dr. Renamed"
    assert _doctor(store, mine)["hospital_id"] == 1
    assert _doctor(store, theirs)["hospital_id"] == 2
    # "Book" does not declare doctors: a mutation of them through it is refused
    r = post_sync(
        live.url, "Book", token="token-h1", client_id="desk",
        mutations=[_mutation(5, "LocalDoctor", mine, name="Dr. Again")],
    )  # fmt: skip
    assert push_results(r).results[0].code == "read-only-table"
    assert _doctor(store, mine)["name"] == "Dr. Renamed"


def test_an_out_of_scope_booking_does_not_reveal_the_other_hospitals_schedule(server, live, store):
    theirs = doctors_of(store, 2)[0]
    with store.engine.connect() as conn:
        busy = conn.execute(
            sa.select(appointment.c.starts_at, appointment.c.ends_at, appointment.c.patient_id)
            .where(appointment.c.doctor_id == theirs, appointment.c.status == "booked")
            .limit(1)
        ).one()
    booking = Mutation(
        seq=1, id="b1", table="LocalAppointment", key="0190aaaa-0000-7000-8000-000000000001",
        op="insert",
        values={"doctor_id": theirs, "patient_id": busy.patient_id,
                "starts_at": busy.starts_at.isoformat(), "ends_at": busy.ends_at.isoformat(),
                "status": "booked", "room": "1", "notes": ""},
    )  # fmt: skip
    before = db_state(store.engine)["appointment"]

    r = post_sync(
        live.url, "SendAppointments", token="token-h1", client_id="d", mutations=[booking]
    )

    (result,) = push_results(r).results
    assert result.status == "rejected"
    assert result.code == "out-of-scope"
    assert "booked" not in result.reason
    assert str(theirs) not in result.reason
    assert result.server_row is None
    assert db_state(store.engine)["appointment"] == before


def test_a_pushed_row_must_reference_existing_rows(server, live, store):
    mine = doctors_of(store, 1)[0]
    start = dt.datetime(2031, 1, 1, 9, 0)
    booking = Mutation(
        seq=1, id="b1", table="LocalAppointment", key="0190aaaa-0000-7000-8000-000000000002",
        op="insert",
        values={"doctor_id": mine, "patient_id": 999_999, "starts_at": start.isoformat(),
                "ends_at": (start + dt.timedelta(minutes=30)).isoformat(), "status": "booked",
                "room": "1", "notes": ""},
    )  # fmt: skip
    before = db_state(store.engine)["appointment"]

    r = post_sync(
        live.url, "SendAppointments", token="token-h1", client_id="d", mutations=[booking]
    )

    (result,) = push_results(r).results
    assert result.status == "rejected"
    assert result.code == "constraint"
    assert "foreign key" in result.reason.lower()  # SQLite's and PostgreSQL's words
    assert db_state(store.engine)["appointment"] == before


def hooked_schema() -> SyncSchema:
    """Appointments guarded by an ``authorize`` hook that refuses a suspended principal,
    pulled and pushed by "Online" and pushed alone by "Send"."""
    guarded = Stream(
        "appointments",
        appointment,
        appointment_columns,
        joins=appointment_joins,
        where=doctor.c.hospital_id == my_hospital,
        local_table="LocalAppointment",
        authorize=lambda principal, params: not principal.params.get("suspended"),
    )
    return SyncSchema(
        [
            SyncUnit("Online", [guarded], direction="both"),
            SyncUnit("Send", [guarded], direction="push"),
        ]
    )


@pytest.mark.parametrize("unit", ["Send", "Online"])
def test_a_stream_s_authorize_hook_guards_its_writes_through_every_unit(
    make_server, serve, store, unit
):
    from hospital.generate import generate

    from syncunit.server import Principal, TokenAuth

    server = make_server(hooked_schema())
    server.authenticate = TokenAuth(
        {
            "ok": Principal("ok", {"hospital_id": 1}),
            "suspended": Principal("sus", {"hospital_id": 1, "suspended": True}),
        }
    )
    generate(store.engine, appointments=40, hospitals=2, doctors=6, patients=20)
    live = serve(server.app)
    own = appointments_of(store, 1)[0]
    before = db_state(store.engine)

    r = post_sync(
        live.url, unit, token="suspended", client_id="sus-1",
        mutations=[_mutation(1, "LocalAppointment", own, notes="while suspended")],
    )  # fmt: skip

    assert r.status_code == 403, r.text
    assert r.json()["code"] == "forbidden"
    assert "appointments" in r.json()["detail"]
    assert db_state(store.engine) == before
    # The same push of a principal the hook lets in is applied.
    r = post_sync(
        live.url, unit, token="ok", client_id="ok-1",
        mutations=[_mutation(1, "LocalAppointment", own, notes="allowed")],
    )  # fmt: skip
    assert [x.status for x in push_results(r).results] == ["applied"]
