"""Delta pulls: only changes travel; removals for deletes and rows leaving the scope.

DESIGN section 4 (data flow), invariants 1 (no missed change), 4 (no
resurrection), 5 (scope) and 6 (pay for change): after every sync the local
tables equal the streams' queries for the principal, and a delta carries
exactly the rows that changed.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from hospital.models import appointment, doctor, hospital, patient, staff

from syncunit.protocol import Chunk
from tests.support import (
    appointments_of,
    chunks,
    doctors_of,
    expected_rows,
    local_keys,
    local_rows,
    removed_keys,
    sent_keys,
)


def _cursors(client):
    return dict(client.store.conn.execute("SELECT stream, cursor FROM syncunit_cursors"))


def test_first_sync_downloads_the_scope_once(tapped, tap, store, in_sync):
    result = tapped.sync("Login")

    mine = appointments_of(store, 1)
    assert len(mine) == 200
    assert result.rows_in == {"LocalDoctor": 10, "LocalAppointment": 200}
    assert sorted(sent_keys(tap.last, "appointments")) == mine  # each row exactly once
    assert sorted(sent_keys(tap.last, "doctors")) == list(range(1, 11))
    assert tapped.store.last_sync_on("Login") is not None
    in_sync(tapped)


def test_delta_sends_only_the_changed_rows(tapped, tap, store, in_sync):
    tapped.sync("Login")
    mine = appointments_of(store, 1)
    changed = sorted([mine[3], mine[50], mine[120]])
    with store.write() as conn:
        conn.execute(
            appointment.update()
            .where(appointment.c.id.in_(changed))
            .values(notes="moved to the afternoon", room="R99")
        )

    result = tapped.sync("Login")

    assert result.rows_in == {"LocalDoctor": 0, "LocalAppointment": 3}
    assert result.total_removed == 0
    assert sorted(sent_keys(tap.last, "appointments")) == changed
    assert sent_keys(tap.last, "doctors") == []
    local = {r[0]: r[1:] for r in tapped.store.rows("LocalAppointment", ["id", "notes", "room"])}
    assert {k: local[k] for k in changed} == dict.fromkeys(
        changed, ("moved to the afternoon", "R99")
    )
    in_sync(tapped)


def test_unchanged_second_sync_transfers_no_rows(tapped, tap, in_sync):
    tapped.sync("Login")
    before = _cursors(tapped)

    result = tapped.sync("Login")

    assert result.total_in == 0
    assert result.total_removed == 0
    assert all(not c.row_count() and not c.removed and not c.reset for c in chunks(tap.last))
    assert _cursors(tapped) == before  # nothing changed: the same position
    in_sync(tapped)


def test_writes_outside_the_scope_transfer_no_rows(tapped, tap, store, in_sync):
    tapped.sync("Login")
    theirs = appointments_of(store, 2)
    with store.write() as conn:
        conn.execute(
            appointment.update().where(appointment.c.id.in_(theirs[:40])).values(notes="h2 only")
        )
        conn.execute(patient.insert().values(id=10_001, name="New Patient", phone="+351 0"))

    result = tapped.sync("Login")

    assert result.total_in == 0
    assert result.total_removed == 0
    assert sent_keys(tap.last, "appointments") == []
    assert removed_keys(tap.last, "appointments") == []
    in_sync(tapped)


def test_renamed_doctor_resends_exactly_their_appointments(tapped, tap, store, in_sync):
    tapped.sync("Login")
    doc = doctors_of(store, 1)[0]
    theirs = appointments_of(store, 1, doctor_id=doc)
    assert 10 < len(theirs) < 200
    with store.write() as conn:
        conn.execute(doctor.update().where(doctor.c.id == doc).values(name="Dr. Renamed"))

    result = tapped.sync("Login")

    assert sorted(sent_keys(tap.last, "appointments")) == theirs
    assert sent_keys(tap.last, "doctors") == [doc]
    assert result.rows_in == {"LocalDoctor": 1, "LocalAppointment": len(theirs)}
    names = dict(tapped.store.rows("LocalAppointment", ["id", "doctor_name"]))
    assert {k for k, name in names.items() if name == "Dr. Renamed"} == set(theirs)
    assert dict(tapped.store.rows("LocalDoctor", ["id", "name"]))[doc] == "Dr. Renamed"
    in_sync(tapped)


def test_renamed_patient_resends_their_appointments_in_scope(tapped, tap, store, in_sync):
    tapped.sync("Login")
    pid = dict(tapped.store.rows("LocalAppointment", ["id", "patient_id"]))[
        appointments_of(store, 1)[0]
    ]
    with store.write() as conn:
        conn.execute(patient.update().where(patient.c.id == pid).values(name="Renamed Patient"))
        in_scope = conn.execute(
            sa.select(appointment.c.id)
            .join(doctor, doctor.c.id == appointment.c.doctor_id)
            .where(appointment.c.patient_id == pid, doctor.c.hospital_id == 1)
        ).scalars()
        in_scope = sorted(in_scope)

    tapped.sync("Login")

    assert sorted(sent_keys(tap.last, "appointments")) == in_scope
    in_sync(tapped)


def test_deleted_row_is_removed(tapped, tap, store, in_sync):
    tapped.sync("Login")
    gone = appointments_of(store, 1)[7]
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.id == gone))

    result = tapped.sync("Login")

    assert removed_keys(tap.last, "appointments") == [gone]
    assert result.rows_removed["LocalAppointment"] == 1
    assert result.rows_in["LocalAppointment"] == 0
    assert gone not in local_keys(tapped, "LocalAppointment")
    in_sync(tapped)
    # No resurrection: later changes around it do not bring it back.
    with store.write() as conn:
        conn.execute(appointment.update().values(notes="everyone"))
    tapped.sync("Login")
    assert gone not in local_keys(tapped, "LocalAppointment")
    in_sync(tapped)


def test_reassigned_appointment_leaves_one_scope_and_enters_the_other(make_client, store, in_sync):
    h1 = make_client("token-h1", name="h1")
    h2 = make_client("token-h2", name="h2")
    h1.sync("Login")
    h2.sync("Login")
    moved = appointments_of(store, 1)[10]
    other = doctors_of(store, 2)[0]
    with store.write() as conn:
        conn.execute(appointment.update().where(appointment.c.id == moved).values(doctor_id=other))

    r1 = h1.sync("Login")
    r2 = h2.sync("Login")

    assert r1.rows_removed["LocalAppointment"] == 1
    assert moved not in local_keys(h1, "LocalAppointment")
    assert r2.rows_in["LocalAppointment"] == 1
    assert moved in local_keys(h2, "LocalAppointment")
    in_sync(h1, token="token-h1")
    in_sync(h2, token="token-h2")


def test_doctor_moved_to_another_hospital_moves_all_their_appointments(make_client, store, in_sync):
    h1 = make_client("token-h1", name="h1")
    h2 = make_client("token-h2", name="h2")
    h1.sync("Login")
    h2.sync("Login")
    doc = doctors_of(store, 1)[1]
    theirs = appointments_of(store, 1, doctor_id=doc)
    with store.write() as conn:
        conn.execute(doctor.update().where(doctor.c.id == doc).values(hospital_id=2))

    r1 = h1.sync("Login")
    r2 = h2.sync("Login")

    assert r1.rows_removed["LocalAppointment"] == len(theirs)
    assert not set(theirs) & local_keys(h1, "LocalAppointment")
    assert set(theirs) <= local_keys(h2, "LocalAppointment")
    assert r2.rows_in["LocalAppointment"] == len(theirs)
    # The doctors stream is not filtered: the doctor stays, with the new hospital.
    assert dict(h1.store.rows("LocalDoctor", ["id", "hospital_id"]))[doc] == 2
    in_sync(h1, token="token-h1")
    in_sync(h2, token="token-h2")


def test_row_moving_out_and_back_before_a_sync_stays(tapped, store, in_sync):
    tapped.sync("Login")
    mine = appointments_of(store, 1)
    row, doc = mine[20], doctors_of(store, 1)[2]
    other = doctors_of(store, 2)[0]
    with store.write() as conn:
        conn.execute(appointment.update().where(appointment.c.id == row).values(doctor_id=other))
    with store.write() as conn:
        conn.execute(
            appointment.update()
            .where(appointment.c.id == row)
            .values(doctor_id=doc, notes="back again")
        )

    result = tapped.sync("Login")

    assert result.rows_removed["LocalAppointment"] == 0
    assert dict(tapped.store.rows("LocalAppointment", ["id", "notes"]))[row] == "back again"
    assert local_keys(tapped, "LocalAppointment") == set(mine)
    in_sync(tapped)


def test_doctor_moving_out_and_back_keeps_their_appointments(tapped, store, in_sync):
    tapped.sync("Login")
    doc = doctors_of(store, 1)[0]
    with store.write() as conn:
        conn.execute(doctor.update().where(doctor.c.id == doc).values(hospital_id=2))
    with store.write() as conn:
        conn.execute(doctor.update().where(doctor.c.id == doc).values(hospital_id=1))

    result = tapped.sync("Login")

    assert result.rows_removed["LocalAppointment"] == 0
    assert local_keys(tapped, "LocalAppointment") == set(appointments_of(store, 1))
    in_sync(tapped)


def test_renamed_hospital_reaches_doctors_and_appointments(tapped, tap, store, in_sync):
    tapped.sync("Login")
    with store.write() as conn:
        conn.execute(hospital.update().where(hospital.c.id == 1).values(name="Saint Mary"))

    result = tapped.sync("Login")

    assert result.rows_in == {"LocalDoctor": 5, "LocalAppointment": 200}
    assert {r[0] for r in tapped.store.rows("LocalAppointment", ["hospital"])} == {"Saint Mary"}
    in_sync(tapped)


def test_changed_principal_parameters_reset_the_stream(tapped, tap, store, in_sync):
    tapped.sync("Login")
    tapped.sync("Splash")
    assert local_keys(tapped, "LocalAppointment") == set(appointments_of(store, 1))
    with store.write() as conn:
        conn.execute(staff.update().where(staff.c.token == "token-h1").values(hospital_id=2))

    login = tapped.sync("Login")
    splash = tapped.sync("Splash")

    assert login.resets == ["appointments"]  # the doctors stream has no parameters
    assert chunks(tap.responses[-2], "appointments")[0].reset
    assert local_keys(tapped, "LocalAppointment") == set(appointments_of(store, 2))
    assert splash.resets == ["summary"]
    in_sync(tapped, "Login")
    in_sync(tapped, "Splash")


def test_a_write_during_a_sync_arrives_with_the_next_one(tapped, tap, server, store, in_sync):
    """Rows and cursor come from one read snapshot (DESIGN section 6): a write
    committed while the response streams is neither half-applied nor skipped."""
    tapped.sync("Login")
    mine = appointments_of(store, 1)
    with store.write() as conn:
        conn.execute(appointment.update().values(notes="first wave"))
    expected_before = expected_rows(server, "appointments", {"hospital_id": 1})
    written = []

    def write_once(frame):
        if not written and isinstance(frame, Chunk) and frame.stream == "appointments":
            with store.write() as conn:
                conn.execute(
                    appointment.update()
                    .where(appointment.c.id.in_([mine[0], mine[-1]]))
                    .values(notes="second wave")
                )
                conn.execute(appointment.delete().where(appointment.c.id == mine[1]))
            written.append(True)

    tap.on_frame = write_once
    first = tapped.sync("Login")
    tap.on_frame = None

    assert written
    assert first.rows_in["LocalAppointment"] == 200
    assert local_rows(tapped, server, "appointments") == expected_before
    second = tapped.sync("Login")
    assert sorted(sent_keys(tap.last, "appointments")) == sorted([mine[0], mine[-1]])
    assert removed_keys(tap.last, "appointments") == [mine[1]]
    assert second.rows_in["LocalAppointment"] == 2
    in_sync(tapped)


def test_units_sharing_a_stream_share_its_cursor(tapped, tap, store, in_sync):
    tapped.sync("Login")
    with store.write() as conn:
        conn.execute(doctor.update().where(doctor.c.id == 2).values(name="Dr. Shared"))

    online = tapped.sync("Online")  # summary, doctors and appointments
    again = tapped.sync("Login")

    assert online.rows_in["LocalDoctor"] == 1
    assert again.total_in == 0
    in_sync(tapped, "Online")


def test_progress_reaches_the_announced_total(make_client, in_sync):
    seen = []
    client = make_client(on_progress=lambda unit, done, total: seen.append((unit, done, total)))

    client.sync("Login")

    assert seen
    assert {u for u, _, _ in seen} == {"Login"}
    dones = [d for _, d, _ in seen]
    assert dones == sorted(dones)
    assert seen[-1][1:] == (210, 210)  # 10 doctors and 200 appointments
    in_sync(client)


def test_chunks_carry_only_the_streams_columns_and_rows_in_scope(tapped, tap, server, store):
    tapped.sync("Login")
    with store.write() as conn:
        conn.execute(hospital.update().values(city="Anywhere"))  # every row of both hospitals
    tapped.sync("Login")

    for frames in tap.responses:
        for c in chunks(frames):
            if c.row_count():
                assert c.columns == list(server.schema.streams[c.stream].columns)
        assert set(sent_keys(frames, "appointments")) <= set(appointments_of(store, 1))


def test_a_delta_is_the_same_read_by_version_or_through_the_scope(server, monkeypatch):
    """Few changes are found by version, many through the pinned scope; on PostgreSQL a
    few candidates are read first, then their rows by key, and few tombstones are read
    by version: always the same frames."""
    from hospital.units import appointments

    from syncunit.protocol import encode_frame
    from syncunit.server import changes
    from syncunit.server.changes import StreamReader
    from syncunit.server.cursor import encode_cursor

    store = server.store
    reader = StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=3)
    with store.snapshot() as (conn, since):
        facts = store.facts(conn)
    token = encode_cursor(reader._cursor(facts["epoch"], "done", since=since, high=since))
    mine, theirs = appointments_of(store, 1), appointments_of(store, 2)
    d1, d2 = doctors_of(store, 1), doctors_of(store, 2)
    a = appointment
    with store.write() as conn:  # edits in and out of scope, moves both ways, a delete
        conn.execute(a.update().where(a.c.id.in_(mine[:5])).values(room="R7"))
        conn.execute(a.update().where(a.c.id.in_(theirs[:5])).values(room="R8"))
        conn.execute(a.update().where(a.c.id == mine[6]).values(doctor_id=d2[0]))
        conn.execute(a.update().where(a.c.id == theirs[6]).values(doctor_id=d1[0]))
        conn.execute(a.delete().where(a.c.id == mine[7]))
        conn.execute(doctor.update().where(doctor.c.id == d1[1]).values(name="Dr. Renamed"))

    def delta(few: int, keyed: int = 1_000) -> list[Any]:
        monkeypatch.setattr(changes, "FEW_CHANGES", few)
        monkeypatch.setattr(changes, "KEYED_CANDIDATES", keyed)  # PostgreSQL: keys first
        with store.snapshot() as (conn, watermark):
            assert reader._few_changes(conn, since) == (few > 0)
            # PostgreSQL: few tombstones too are read by version, not key by key.
            assert reader._few_tombstones(conn, since) == (few > 0 and store.pins_each_key)
            horizon = int(facts.get("horizon", "0"))
            return list(reader.frames(conn, watermark, facts["epoch"], horizon, token))

    by_version, pinned = delta(1_000), delta(0)
    assert [encode_frame(f) for f in by_version] == [encode_frame(f) for f in pinned]
    for few in (1_000, 0):  # one statement, the candidate keys read first by none
        assert [encode_frame(f) for f in delta(few, keyed=-1)] == [
            encode_frame(f) for f in by_version
        ]
    parts = [f for f in by_version if isinstance(f, Chunk)]
    assert len(parts) > 4  # several chunks: their order and resume points agree too
    upserted = set(sent_keys(parts, "appointments"))
    removed = {k for f in parts for k in f.removed}
    assert {*mine[:5], theirs[6]} <= upserted
    assert not upserted & {*theirs[:5], mine[6], mine[7]}
    assert {mine[6], mine[7]} <= removed
