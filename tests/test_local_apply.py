"""A delta rewrites a local row's index entries only where an indexed value changed.

The local table's secondary indexes (``StreamInfo.indexes``) would otherwise be
rewritten for every row a delta updates: in a large table that is about three
pages written per row instead of one (``docs/performance.md``, *Delta at 1M
rows against 10k*). The rows must come out the same either way (DESIGN 5.1).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support import appointments_of, doctors_of

NEW_ROW = (
    "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status, room, notes)"
    " VALUES (:id, :doctor, 1, '2026-03-02 09:00:00.000000', '2026-03-02 09:15:00.000000',"
    " 'booked', 'R7', :notes)"
)


@contextmanager
def counting_index_writes(conn: sqlite3.Connection) -> Iterator[dict[str, int]]:
    """Count the updates that set an indexed column of LocalAppointment (a temp trigger
    ``AFTER UPDATE OF`` fires for every row a statement sets those columns on)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS index_writes (id TEXT)")
    conn.execute("DELETE FROM temp.index_writes")
    conn.execute(
        'CREATE TEMP TRIGGER IF NOT EXISTS count_index_writes AFTER UPDATE OF "starts_at",'
        ' "doctor_id" ON main."LocalAppointment"'
        " BEGIN INSERT INTO index_writes VALUES (NEW.id); END"
    )
    seen: dict[str, int] = {}
    try:
        yield seen
    finally:
        for (key,) in conn.execute("SELECT id FROM temp.index_writes"):
            seen[key] = seen.get(key, 0) + 1
        conn.execute("DROP TRIGGER temp.count_index_writes")


def test_a_change_to_unindexed_columns_leaves_the_index_entries_alone(
    client, store, plain_sql, in_sync
):
    client.sync("Login")
    info = client.store.catalog().stream("appointments")
    assert {"starts_at", "doctor_id"} <= {c for ix in info.indexes for c in ix}
    mine = appointments_of(store, 1)[:20]

    with plain_sql.transaction() as run:
        for key in mine:
            run(
                "UPDATE appointment SET notes = 'by phone', room = 'R9' WHERE id = :id", {"id": key}
            )
    with counting_index_writes(client.store.conn) as writes:
        result = client.sync("Login")

    assert result.rows_in["LocalAppointment"] == len(mine)
    assert writes == {}  # the plain upsert set starts_at and doctor_id on all 20
    rows = dict(client.store.rows("LocalAppointment", ["id", "notes"]))
    assert {rows[k] for k in mine} == {"by phone"}
    in_sync(client)


def test_indexed_columns_that_change_are_written_beside_rows_that_do_not(
    client, store, plain_sql, in_sync
):
    client.sync("Login")
    mine = appointments_of(store, 1)
    doctors = doctors_of(store, 1)
    moved, rescheduled, noted = mine[:3], mine[3:6], mine[6:9]

    with plain_sql.transaction() as run:
        for key in moved:
            run(
                "UPDATE appointment SET doctor_id = :d WHERE id = :id", {"d": doctors[1], "id": key}
            )
        for key in rescheduled:
            run(
                "UPDATE appointment SET starts_at = '2027-01-05 08:00:00.000000',"
                " notes = 'later' WHERE id = :id",
                {"id": key},
            )
        for key in noted:
            run("UPDATE appointment SET notes = 'noted' WHERE id = :id", {"id": key})
        run(NEW_ROW, {"id": "walk-in-1", "doctor": doctors[0], "notes": "walk-in"})
    with counting_index_writes(client.store.conn) as writes:
        client.sync("Login")

    assert set(writes) == {*moved, *rescheduled}
    rows = client.store.rows("LocalAppointment", ["id", "doctor_id", "starts_at"])
    local = {r[0]: r[1:] for r in rows}
    assert {local[k][0] for k in moved} == {doctors[1]}
    assert all(local[k][1].startswith("2027-01-05") for k in rescheduled)
    assert "walk-in-1" in local
    # The indexes answer with the new values (their entries were rewritten).
    by_doctor = client.store.query(
        'SELECT id FROM "LocalAppointment" INDEXED BY "ix_LocalAppointment_doctor_id_starts_at"'
        " WHERE doctor_id = ?",
        (doctors[1],),
    )
    assert set(moved) <= {r[0] for r in by_doctor}
    later = client.store.query(
        'SELECT id FROM "LocalAppointment" INDEXED BY "ix_LocalAppointment_starts_at"'
        " WHERE starts_at >= '2027'"
    )
    assert {r[0] for r in later} == set(rescheduled)
    assert client.store.query("PRAGMA integrity_check") == [("ok",)]
    in_sync(client)


def test_a_first_copy_inserts_with_one_statement_per_row(client, in_sync):
    statements: list[str] = []
    client.store.conn.set_trace_callback(statements.append)
    try:
        client.sync("Login")  # a small copy: its indexes are not suspended
    finally:
        client.store.conn.set_trace_callback(None)

    writes = [s for s in statements if '"LocalAppointment"' in s and "syncunit" not in s]
    assert any(s.startswith('INSERT INTO "LocalAppointment"') for s in writes)
    assert not [s for s in writes if s.startswith('UPDATE "LocalAppointment"')]
    in_sync(client)
