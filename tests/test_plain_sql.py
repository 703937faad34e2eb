"""Writes that bypass syncunit (a backoffice, a SQL console) are tracked all the same.

DESIGN section 6: tracked tables get versions and tombstones from database
triggers, "whoever writes it: the sync server, a backoffice app, plain SQL".
``plain_sql`` runs SQL with the bare driver, without syncunit or SQLAlchemy.
"""

from __future__ import annotations

import pytest
from hospital.backoffice import run_backoffice

from tests.support import appointments_of, doctors_of, local_keys, removed_keys, sent_keys

NEW_ROW = (
    "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status, room, notes)"
    " VALUES (:id, :doctor, 1, '2026-03-02 09:00:00.000000', '2026-03-02 09:15:00.000000',"
    " 'booked', 'R7', :notes)"
)


def test_plain_sql_insert_update_delete_reach_the_client(tapped, tap, store, plain_sql, in_sync):
    tapped.sync("Login")
    mine = appointments_of(store, 1)
    doc = doctors_of(store, 1)[0]

    with plain_sql.transaction() as run:
        run(NEW_ROW, {"id": "plain-1", "doctor": doc, "notes": "walk-in"})
        run("UPDATE appointment SET notes = 'by phone' WHERE id = :id", {"id": mine[5]})
        run("DELETE FROM appointment WHERE id = :id", {"id": mine[6]})
        run("UPDATE patient SET name = 'Renamed By SQL' WHERE id = 1")
    result = tapped.sync("Login")

    assert "plain-1" in sent_keys(tap.last, "appointments")
    assert mine[5] in sent_keys(tap.last, "appointments")
    assert removed_keys(tap.last, "appointments") == [mine[6]]
    assert result.rows_removed["LocalAppointment"] == 1
    notes = dict(tapped.store.rows("LocalAppointment", ["id", "notes"]))
    assert notes["plain-1"] == "walk-in"
    assert notes[mine[5]] == "by phone"
    assert mine[6] not in notes
    in_sync(tapped)


def test_plain_sql_changing_a_primary_key_removes_the_old_key(tapped, store, plain_sql, in_sync):
    tapped.sync("Login")
    old = appointments_of(store, 1)[0]

    plain_sql("UPDATE appointment SET id = 'rekeyed' WHERE id = :id", {"id": old})
    tapped.sync("Login")

    keys = local_keys(tapped, "LocalAppointment")
    assert old not in keys
    assert "rekeyed" in keys
    in_sync(tapped)


def test_plain_sql_upsert_moving_a_row_out_of_scope(tapped, store, plain_sql, in_sync):
    tapped.sync("Login")
    row = appointments_of(store, 1)[3]
    other = doctors_of(store, 2)[0]

    plain_sql(
        NEW_ROW + " ON CONFLICT (id) DO UPDATE SET doctor_id = excluded.doctor_id",
        {"id": row, "doctor": other, "notes": ""},
    )
    tapped.sync("Login")

    assert row not in local_keys(tapped, "LocalAppointment")
    in_sync(tapped)


def test_sqlite_insert_or_replace_moving_a_row_out_of_scope(
    backend, tapped, store, plain_sql, in_sync
):
    """REPLACE deletes the old row without firing delete triggers (unless
    recursive_triggers is on): the old scope must still be recorded."""
    if backend != "sqlite":
        pytest.skip("INSERT OR REPLACE is SQLite's")
    tapped.sync("Login")
    row = appointments_of(store, 1)[4]
    other = doctors_of(store, 2)[0]

    plain_sql(
        NEW_ROW.replace("INSERT INTO", "INSERT OR REPLACE INTO"),
        {"id": row, "doctor": other, "notes": "replaced"},
    )
    tapped.sync("Login")

    assert row not in local_keys(tapped, "LocalAppointment")
    in_sync(tapped)


def test_backoffice_edits_reach_devices_of_both_hospitals(
    backend, make_client, server_db_url, in_sync
):
    """The example's backoffice: reschedule, cancel, reassign, rename a doctor."""
    if backend != "sqlite":
        pytest.skip("the example's backoffice writes SQLite files")
    h1 = make_client("token-h1", name="h1")
    h2 = make_client("token-h2", name="h2")
    h1.sync("Login")
    h2.sync("Login")

    report = run_backoffice(server_db_url.removeprefix("sqlite:///"), 1, count=20)
    r1 = h1.sync("Login")
    r2 = h2.sync("Login")

    keys1 = local_keys(h1, "LocalAppointment")
    assert not set(report.cancelled) & keys1
    assert not set(report.reassigned) & keys1
    assert set(report.reassigned) <= local_keys(h2, "LocalAppointment")
    assert r1.rows_removed["LocalAppointment"] == 40
    assert r2.rows_in["LocalAppointment"] == 20
    notes = dict(h1.store.rows("LocalAppointment", ["id", "notes"]))
    assert {notes[k] for k in report.rescheduled} == {"rescheduled by backoffice"}
    names = {
        r[0]
        for r in h1.store.rows("LocalAppointment", ["doctor_name", "doctor_id"])
        if r[1] == report.renamed_doctor
    }
    assert len(names) == 1
    assert names.pop().endswith("(renamed)")
    in_sync(h1, token="token-h1")
    in_sync(h2, token="token-h2")
