"""Query plans that keep deltas paying for changes, not for table size.

Timing is the benchmarks' job; these tests pin the plan shapes that make the
timings possible, so a change that brings back a full scan fails here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import sqlalchemy as sa
from hospital.units import appointments

from syncunit.client.store import LocalStore
from syncunit.server.changes import StreamReader
from syncunit.server.store import ServerStore


def _sqlite_only(store: ServerStore) -> None:
    if store.dialect != "sqlite":
        pytest.skip(
            "plan shapes are pinned for SQLite; PostgreSQL's cost-based planner rightly"
            " scans tables this small (its plans are the benchmarks' business)"
        )


def _plan(store: ServerStore, query: Any, params: dict[str, Any]) -> list[str]:
    compiled = query.compile(store.engine)
    bound = compiled.construct_params(params)
    args = [bound[k] for k in compiled.positiontup]
    with store.engine.connect() as conn:
        raw = conn.connection.driver_connection
        return [row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + str(compiled), args)]


def _pg_plan(
    store: ServerStore, query: Any, params: dict[str, Any], conn: sa.Connection | None = None
) -> str:
    """PostgreSQL's plan for ``query``, as ``EXPLAIN`` prints it (on ``conn``, in its
    transaction, if given)."""
    compiled = query.compile(store.engine)
    with contextlib.nullcontext(conn) if conn is not None else store.engine.connect() as c:
        rows = c.exec_driver_sql("EXPLAIN " + str(compiled), compiled.construct_params(params))
        return "\n".join(row[0] for row in rows)


def test_a_delta_reads_through_the_scope_not_everyones_changes(server: Any) -> None:
    """The filter pins the hospital: changed rows and tombstones are found through it."""
    store = server.store
    _sqlite_only(store)
    reader = StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=100)
    with store.snapshot() as (_, watermark):
        since = watermark - 5
    upserts = (
        reader.rows_select(drive_by_base=True, raw=True)
        .add_columns(reader._effective_version().label("_ev"))
        .where(appointments.key_column.in_(reader._candidates(since)))
    )
    plans = [_plan(store, q, {"hospital_id": 1}) for q in (upserts, reader._removals(since, None))]
    for plan in plans:
        big = ("SCAN appointment", "SCAN doctor", "SCAN patient", "SCAN ts_")
        assert not [p for p in plan if p.startswith(big)], plan
    # The outer loop of the upserts is the candidate keys, not the rows in scope.
    assert plans[0][0].startswith("SEARCH appointment"), plans[0]
    assert "(id=?)" in plans[0][0], plans[0]
    # The base table's changed rows: those of the hospital's doctors, by (doctor, version).
    scoped = "ix_appointment_doctor_id_syncunit_version (doctor_id=? AND syncunit_version>?)"
    assert any(scoped in p for p in plans[0]), plans[0]
    # Its tombstones: those whose old doctor was one of them, by (old doctor, version).
    assert any(
        "ix_syncunit_tombstones_old_doctor_id (<expr>=? AND version>?)" in p for p in plans[1]
    ), plans[1]
    assert not any("ix_syncunit_tombstones_table_version (table_name=? AND version>?)" in p
                   and "ts_appointment" in p for p in plans[1]), plans[1]  # fmt: skip


def test_a_first_copy_of_most_of_the_table_streams_in_key_order(server: Any) -> None:
    store = server.store
    _sqlite_only(store)
    reader = StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=100)
    query = reader.rows_select(drive_by_base=True, raw=True).order_by(appointments.key_column)
    plan = _plan(store, query, {"hospital_id": 1})
    assert not any("TEMP B-TREE" in p for p in plan), plan  # no sort before the first row


def test_the_outbox_triggers_find_a_rows_entry_by_index(client: Any) -> None:
    client.catalog()
    store: LocalStore = client.store
    plan = store.query(
        "EXPLAIN QUERY PLAN SELECT 1 FROM syncunit_outbox"
        " WHERE table_name = 'LocalAppointment' AND row_key = 'k' AND seq IS NULL"
    )
    assert any("ix_syncunit_outbox_row_seq" in row[3] for row in plan), plan


def test_raw_reads_give_the_same_values_as_sqlalchemy(server: Any) -> None:
    """The SQLite store reads rows raw; they must equal the typed values on the wire."""
    store = server.store
    if store.dialect != "sqlite":
        pytest.skip("only the SQLite store reads rows raw")
    reader = StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=100)
    assert reader.raw
    with store.snapshot() as (conn, _):
        raw = conn.execute(reader.rows_select(raw=True), reader.params).all()
        typed = conn.execute(reader.rows_select(), reader.params).all()
    from syncunit.server.changes import to_wire

    assert [tuple(r) for r in raw] == [tuple(to_wire(v) for v in r) for r in typed]
    assert sa.DateTime in {type(c.type) for c in appointments.columns.values()}


def _write_appointments(store: ServerStore, hospital_id: int, count: int) -> list[str]:
    from hospital.models import appointment

    from tests.support import appointments_of

    keys = appointments_of(store, hospital_id)[:count]
    with store.write() as conn:
        conn.execute(appointment.update().where(appointment.c.id.in_(keys)).values(notes="moved"))
    return keys


def test_a_delta_after_few_writes_finds_them_by_version(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few changed rows (all scopes together) come from the end of the version index;
    past ``FEW_CHANGES``, through the pinned scope, as other scopes' writes would cost."""
    from syncunit.server import changes

    store = server.store
    _sqlite_only(store)
    reader = StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=100)
    with store.snapshot() as (_, since):
        pass
    _write_appointments(store, 2, 3)  # another hospital's: they count all the same
    with store.snapshot() as (conn, _):
        monkeypatch.setattr(changes, "FEW_CHANGES", 3)
        assert reader._few_changes(conn, since)
        monkeypatch.setattr(changes, "FEW_CHANGES", 2)
        assert not reader._few_changes(conn, since)
    by_version = reader._delta_queries(pinned=False).upserts
    params = {"hospital_id": 1, changes.SINCE: since}
    plan = _plan(store, by_version, params)
    big = ("SCAN appointment", "SCAN doctor", "SCAN patient", "SCAN ts_")
    assert not [p for p in plan if p.startswith(big)], plan
    assert any("ix_appointment_syncunit_version (syncunit_version>?)" in p for p in plan), plan
    scoped = "ix_appointment_doctor_id_syncunit_version (doctor_id=? AND syncunit_version>?)"
    assert not any(scoped in p for p in plan), plan
    pinned = _plan(store, reader._delta_queries().upserts, params)
    assert any(scoped in p for p in pinned), pinned


def test_a_delta_on_postgresql_seeks_the_scope_whatever_its_statistics_say(
    make_server: Any, store: ServerStore
) -> None:
    """Statistics taken before a burst of writes in other scopes put a handful of rows
    above the cursor: the pinned scope's changed rows are still sought by (doctor,
    version), one doctor at a time, not found by walking the burst in the version
    index (``ScopeDriver.each_key``)."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite's planner keeps the scope's index without statistics")
    from hospital.generate import generate
    from hospital.models import appointment, doctor

    make_server()
    generate(store.engine, appointments=20_000, hospitals=10, doctors=100, patients=2_000)
    with store.snapshot() as (_, watermark):
        since = watermark
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    others = sa.select(doctor.c.id).where(doctor.c.hospital_id != 1)
    with store.write() as conn:
        burst = conn.execute(
            appointment.update().where(appointment.c.doctor_id.in_(others)).values(notes="busy")
        ).rowcount
    assert burst > 15_000

    reader = StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=100)
    plan = _pg_plan(store, reader._candidates(since), {"hospital_id": 1})
    assert "ix_appointment_doctor_id_syncunit_version on appointment" in plan, plan
    assert "ix_appointment_syncunit_version on appointment" not in plan, plan

    # Deletes elsewhere too: the removals read the tombstones of the hospital's
    # doctors through the index on their old doctor, one doctor at a time, not every
    # tombstone since the cursor.
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.doctor_id.in_(others.limit(40))))
    plan = _pg_plan(store, reader._removals(since, None), {"hospital_id": 1})
    lines = plan.splitlines()
    own = [i for i, line in enumerate(lines) if "on syncunit_tombstones ts_appointment_1" in line]
    assert own, plan  # the appointments' own tombstones, read by their old doctor
    for i in own:
        # An index scan names its index; a bitmap heap scan, the bitmap index scan below.
        scan = next(line for line in lines[i:] if "Index Scan" in line)
        assert "ix_syncunit_tombstones_appointment_doctor_id" in scan, plan


_PARALLEL_FREE = (
    "parallel_setup_cost",
    "parallel_tuple_cost",
    "min_parallel_table_scan_size",
    "min_parallel_index_scan_size",
)


def test_a_delta_on_postgresql_starts_no_parallel_workers(
    make_server: Any, store: ServerStore
) -> None:
    """A delta's candidate keys are a few index entries per part, read whole (not
    through a cursor): its read transaction turns parallel plans off, even where the
    planner would take them (here made free)."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite has no parallel plans")
    from hospital.generate import generate

    make_server()
    generate(store.engine, appointments=2_000, hospitals=4, doctors=20, patients=200)
    reader = StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=100)

    def plan(conn: sa.Connection, since: int) -> str:
        for setting in _PARALLEL_FREE:
            conn.exec_driver_sql(f"SET LOCAL {setting} = 0")
        return _pg_plan(store, reader._candidates(since), {"hospital_id": 1}, conn)

    with store.snapshot() as (conn, watermark):
        in_a_read = plan(conn, watermark - 5)
    with store.engine.connect() as conn, conn.begin():
        elsewhere = plan(conn, watermark - 5)
    # The same statement in a plain transaction: the planner does take parallel plans.
    assert "Gather" in elsewhere, elsewhere
    assert "Gather" not in in_a_read, in_a_read
