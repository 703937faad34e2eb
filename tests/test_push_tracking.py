"""Rows a batched push inserts are tracked exactly as the triggers would track them.

The batch writes its new rows with one statement and stamps them itself
(``ServerStore.insert_new_rows``): on SQLite the clock is bumped once for the
batch and the insert triggers are set aside for that statement, inside the
push's write transaction. These tests check that nothing leaks from that: the
stamps are the triggers' stamps, every other writer is still tracked after a
push (and after a push whose batch failed midway), and other devices get the
pushed rows, also with a cursor taken while the push was running.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from syncunit.client import SyncClient
from syncunit.protocol import Mutation, MutationResult, SyncRequest
from syncunit.server import Principal, SyncServer
from syncunit.server.migrations import table_tracking
from syncunit.server.store import ServerStore
from tests.support import owner_push_server

STAFF = Principal("staff:1", {"hospital_id": 1})
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
appointment = sa.table(
    "appointment",
    sa.column("id"),
    sa.column("doctor_id"),
    sa.column("patient_id"),
    sa.column("syncunit_version"),
    sa.column("syncunit_created_at"),
    sa.column("syncunit_updated_at"),
)


def _doctor(store: ServerStore) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(sa.text("SELECT min(id) FROM doctor WHERE hospital_id = 1")).one()[0]
        )


def _bookings(store: ServerStore, first: int, count: int, **override: Any) -> list[Mutation]:
    doctor, start = _doctor(store), dt.datetime(2034, 3, 1, 8, 0)
    out = []
    for seq in range(first, first + count):
        at = start + dt.timedelta(minutes=30 * seq)
        row = {
            "id": f"bulk-{seq:04}",
            "doctor_id": doctor,
            "patient_id": 1,
            "starts_at": at.isoformat(),
            "ends_at": (at + dt.timedelta(minutes=30)).isoformat(),
            "status": "booked",
            "room": "R1",
            "notes": "",
        }
        row.update(override.get(str(seq), {}))
        out.append(Mutation(seq, f"m{seq}", "LocalAppointment", row["id"], "insert", row))
    return out


def _push(server: SyncServer, mutations: list[Mutation]) -> list[MutationResult]:
    req = SyncRequest(protocol=1, client_id="tablet", mutations=mutations)
    return server.pusher.apply(STAFF, req, server.schema.units["SendAppointments"]).results


def _stamps(store: ServerStore, prefix: str = "bulk-") -> list[tuple[str, int, str, str]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                appointment.c.id,
                appointment.c.syncunit_version,
                appointment.c.syncunit_created_at,
                appointment.c.syncunit_updated_at,
            )
            .where(appointment.c.id.like(prefix + "%"))
            .order_by(appointment.c.id)
        )
        return [(str(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in rows]


def _intact(server: SyncServer) -> bool:
    store = server.store
    with store.engine.connect() as conn:
        table = next(t for t in server.schema.tracked_tables() if t.name == "appointment")
        return store.tracking_intact(conn, table_tracking(store, server.schema, table, conn))


def _foreign_insert(store: ServerStore, key: str, version: int | None = None) -> None:
    """Another writer (an admin tool, a second app) inserts a row with plain SQL."""
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status,"
                " room, notes, syncunit_version) VALUES (:id, :doctor, 1, :at, :at, 'booked',"
                " 'R9', '', :version)"
            ),
            {
                "id": key,
                "doctor": _doctor(store),
                "at": dt.datetime(2035, 1, 1),
                "version": version,
            },
        )


def test_a_batch_stamps_its_rows_as_the_triggers_would(server, store, batches):
    before = store.current_version()

    results = _push(server, _bookings(store, 1, 40))

    assert [r.status for r in results] == ["applied"] * 40
    assert batches == [True]
    stamps = _stamps(store)
    versions = [v for _, v, _, _ in stamps]
    after = store.current_version()
    assert all(before < v for v in versions)
    if store.dialect == "sqlite":
        # One clock tick per row, in push order, the last one the clock: as the triggers do.
        assert versions == list(range(before + 1, before + 41))
        assert after == versions[-1]
    assert all(STAMP.match(c) and c == u for _, _, c, u in stamps)
    assert _intact(server)


def test_other_writers_are_tracked_after_a_batched_push(server, store, batches):
    _push(server, _bookings(store, 1, 20))
    pushed = max(v for _, v, _, _ in _stamps(store))

    _foreign_insert(store, "foreign-new")
    _foreign_insert(store, "foreign-stale", version=1)  # an ORM writing an old version

    assert batches == [True]
    foreign = _stamps(store, "foreign-")
    assert len(foreign) == 2
    assert all(v > pushed and STAMP.match(c) for _, v, c, _ in foreign)
    assert _intact(server)


def test_a_batch_that_fails_midway_leaves_tracking_whole(server, store, batches):
    # The 7th row names a patient that does not exist: the batch's insert fails on it
    # after six rows went in, and the push goes one by one.
    mutations = _bookings(store, 1, 12, **{"7": {"patient_id": 10**6}})
    before = store.current_version()

    results = _push(server, mutations)

    assert batches == [False]
    assert [r.status for r in results] == ["applied"] * 6 + ["rejected"] + ["applied"] * 5
    assert results[6].code == "constraint"
    stamps = _stamps(store)
    assert [k for k, _, _, _ in stamps] == [m.key for m in mutations if m.seq != 7]
    assert all(v > before for _, v, _, _ in stamps)
    if store.dialect == "sqlite":
        assert len({v for _, v, _, _ in stamps}) == 11  # stamped one by one by the triggers
    assert _intact(server)
    _foreign_insert(store, "foreign-after")
    assert [v > before for _, v, _, _ in _stamps(store, "foreign-")] == [True]


def test_bulk_rows_reach_a_device_that_took_its_cursor_during_the_push(
    server: SyncServer,
    store: ServerStore,
    make_client: Callable[..., SyncClient],
    batches: list[bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = make_client(name="reader")
    reader.sync("Login")
    during: list[int] = []
    real = store.insert_new_rows

    def insert_then_sync(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        real(conn, table, rows)
        # The rows are written, not committed: another device syncs now, from another
        # thread and connection, and takes its cursor then.
        worker = threading.Thread(target=lambda: during.append(reader.sync("Login").total_in))
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive()

    monkeypatch.setattr(store, "insert_new_rows", insert_then_sync)
    mutations = _bookings(store, 1, 30)
    _push(server, mutations)
    monkeypatch.undo()

    assert batches == [True]
    assert during == [0]  # nothing uncommitted was seen
    reader.sync("Login")
    with reader.store.atomic() as c:
        got = {
            r[0]: r[1]
            for r in c.execute(
                "SELECT id, patient_id FROM \"LocalAppointment\" WHERE id LIKE 'bulk-%'"
            )
        }
    assert got == {m.key: 1 for m in mutations}


def test_a_batch_fills_every_tracking_column_the_triggers_fill(server, store, batches):
    # A batch (stamped by the engine) and a lone insert (stamped by the triggers): every
    # ``syncunit_`` column the triggers fill, the batch fills too, whatever they become.
    gone = Mutation(11, "m11", "LocalAppointment", "never-there", "delete")  # ends the run
    _push(server, [*_bookings(store, 1, 10), gone, *_bookings(store, 12, 1)])

    assert batches == [True]
    with store.engine.connect() as conn:
        names = [
            c["name"]
            for c in sa.inspect(conn).get_columns("appointment")
            if c["name"].startswith("syncunit_")
        ]
        filled = {
            key: {n for n, v in zip(names, row, strict=True) if v is not None}
            for key, *row in conn.execute(
                sa.text(
                    f"SELECT id, {', '.join(names)} FROM appointment"
                    " WHERE id IN ('bulk-0001', 'bulk-0012')"
                )
            )
        }
    assert filled["bulk-0012"]  # the triggers' stamp
    assert filled["bulk-0001"] == filled["bulk-0012"]


def _cache(conn: Any) -> int:
    """A connection's ``cache_size`` (SQLAlchemy's or the driver's)."""
    raw = getattr(conn, "connection", None)
    dbapi = conn if raw is None else raw.dbapi_connection
    return int(dbapi.execute("PRAGMA cache_size").fetchone()[0])


@contextlib.contextmanager
def _writers_turn_held(store: Any) -> Iterator[None]:
    """Another thread holds the writers' turn of this process (not SQLite's lock)."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with store._writer.lock:
            holding.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(5)
        yield
    finally:
        done.set()
        thread.join()


@pytest.mark.backends("sqlite")
def test_writers_take_turns_on_one_connection_that_keeps_its_larger_cache(store):
    from syncunit.server.sqlite import WRITE_CACHE_KIB

    with store.write() as conn:
        assert _cache(conn) == -WRITE_CACHE_KIB
        dbapi = conn.connection.dbapi_connection
        conn.exec_driver_sql("CREATE TABLE scratch (n INTEGER)")
    assert store.kept_connections() == 1
    assert _cache(dbapi) == -WRITE_CACHE_KIB  # kept between writes: its pages stay cached
    with store.engine.connect() as reader:  # the pool's other connections: SQLite's default
        assert reader.connection.dbapi_connection is not dbapi
        assert _cache(reader) == -2000
    with store.write() as conn:
        assert conn.connection.dbapi_connection is dbapi
        conn.exec_driver_sql("INSERT INTO scratch VALUES (1)")
    dbapi.execute("PRAGMA cache_size = -100000")  # an app's own, larger: left alone
    with store.write() as conn:
        assert _cache(conn) == -100000
    with store.engine.connect() as reader:
        assert reader.exec_driver_sql("SELECT n FROM scratch").scalars().all() == [1]


@pytest.mark.backends("sqlite")
def test_a_write_that_cannot_begin_lets_its_connection_go(store, monkeypatch):
    import sqlite3

    from syncunit.server import sqlite as sqlite_module

    @sa.event.listens_for(store.engine, "connect")
    def short_wait(dbapi: Any, _record: Any) -> None:  # after the store's own settings
        dbapi.execute("PRAGMA busy_timeout = 50")

    store.engine.dispose()  # the connections made from now on wait 50 ms for SQLite's lock
    with store.write() as conn:
        conn.exec_driver_sql("CREATE TABLE scratch (n INTEGER)")

    def write_one() -> None:
        with store.write() as conn:
            conn.exec_driver_sql("INSERT INTO scratch VALUES (1)")

    monkeypatch.setattr(sqlite_module, "WRITER_WAIT_S", 0.05)
    other = sqlite3.connect(str(store.engine.url.database), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # SQLite's write lock, held by another connection
    try:
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            write_one()  # on the kept connection
        with _writers_turn_held(store), pytest.raises(sa.exc.OperationalError, match="locked"):
            write_one()  # on a pooled one: its turn did not come
        assert store.engine.pool.checkedout() == store.kept_connections() == 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    write_one()
    with store.engine.connect() as reader:
        assert reader.exec_driver_sql("SELECT n FROM scratch").scalars().all() == [1]


def test_a_database_in_memory_keeps_no_writer_connection():
    from syncunit.server.sqlite import SQLiteStore

    store = SQLiteStore.from_url("sqlite://")  # one database per thread's connection
    try:
        with store.write() as conn:
            conn.exec_driver_sql("CREATE TABLE scratch (n INTEGER)")
        assert store.kept_connections() == 0
    finally:
        store.engine.dispose()


@pytest.mark.backends("sqlite")
def test_a_writer_whose_turn_does_not_come_takes_a_larger_cache_and_gives_it_back(
    store, monkeypatch
):
    from syncunit.server import sqlite as sqlite_module

    with store.write() as conn:
        kept = conn.connection.dbapi_connection
    monkeypatch.setattr(sqlite_module, "WRITER_WAIT_S", 0.05)
    with _writers_turn_held(store):
        with store.write() as conn:  # goes on after WRITER_WAIT_S, on another connection
            other = conn.connection.dbapi_connection
            assert other is not kept
            assert _cache(conn) == -sqlite_module.WRITE_CACHE_KIB
            conn.exec_driver_sql("CREATE TABLE scratch (n INTEGER)")
        assert _cache(other) == -2000  # given back with the pool's connection


@pytest.mark.backends("sqlite")
def test_the_kept_writer_connection_is_closed_with_the_engine_and_after_a_failure(store):
    import sqlite3

    from syncunit.server.sqlite import WRITE_CACHE_KIB

    with store.write() as conn:
        first = conn.connection.dbapi_connection
    store.engine.dispose()
    assert store.kept_connections() == 0
    with pytest.raises(sqlite3.ProgrammingError):  # closed now, not when collected
        first.execute("SELECT 1")
    with store.write() as conn:
        second = conn.connection.dbapi_connection
        assert second is not first
        conn.exec_driver_sql("CREATE TABLE scratch (n INTEGER)")

    def write_on_a_lost_connection() -> None:
        with store.write() as conn:
            conn.exec_driver_sql("INSERT INTO scratch VALUES (1)")
            conn.invalidate()  # as a lost connection is
            conn.exec_driver_sql("INSERT INTO scratch VALUES (2)")

    with pytest.raises(sa.exc.PendingRollbackError):
        write_on_a_lost_connection()
    with store.write() as conn:  # a fresh one, set up as a writer's, not the broken one
        assert conn.connection.dbapi_connection is not second
        assert _cache(conn) == -WRITE_CACHE_KIB
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM scratch").scalar_one() == 0
        third = conn.connection.dbapi_connection
        store.engine.dispose()  # while a writer has it: closed once that writer is done
        conn.exec_driver_sql("INSERT INTO scratch VALUES (3)")
    with pytest.raises(sqlite3.ProgrammingError):
        third.execute("SELECT 1")
    with store.write() as conn:
        assert conn.exec_driver_sql("SELECT n FROM scratch").scalars().all() == [3]
    assert store.kept_connections() == 1


@pytest.mark.backends("sqlite")
def test_the_wal_is_copied_back_by_a_thread_not_in_the_commit_that_fills_it(store, monkeypatch):
    import os
    import time

    from syncunit.server import sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY_S", 0.0)
    checkpointer = store._checkpointer
    path = str(store.engine.url.database)
    at_commit: list[int] = []
    poke = sqlite_module.Checkpointer.poke

    def watched(self: Any) -> None:
        at_commit.append(os.path.getsize(path))  # the database file right after the commit
        poke(self)

    monkeypatch.setattr(sqlite_module.Checkpointer, "poke", watched)
    with store.write() as conn:
        conn.exec_driver_sql("CREATE TABLE scratch (b BLOB)")
        for _ in range(60):  # 6 MB: past SQLite's automatic checkpoint (1000 pages)
            conn.exec_driver_sql("INSERT INTO scratch VALUES (randomblob(100000))")
        during = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
        dbapi = conn.connection.dbapi_connection
    assert during == 0
    assert dbapi is not None
    # Off for good on the writers' kept connection; the pool's others keep SQLite's own.
    assert dbapi.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    with store.engine.connect() as reader:
        assert reader.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == 1000

    assert len(at_commit) == 1
    assert at_commit[0] < 1_000_000  # the commit copied nothing back
    deadline = time.monotonic() + 10
    while checkpointer.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpointer.runs >= 1
    assert os.path.getsize(path) > 6_000_000  # the thread did
    with store.engine.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM scratch").scalar_one() == 60


class _Upper(sa.types.TypeDecorator[str]):
    """A type whose values SQL wraps on the way in (``bind_expression``)."""

    impl = sa.String(40)
    cache_ok = True

    def bind_expression(self, bindvalue: Any) -> Any:
        return sa.func.upper(bindvalue)


def test_a_type_that_wraps_its_values_in_sql_keeps_them_wrapped(new_database, batches):
    meta = sa.MetaData()
    tag = sa.Table(
        "tag",
        meta,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("label", _Upper(), nullable=False),
    )
    user = Principal("user-1", {"owner": "u1"})
    server = owner_push_server(new_database("tags"), tag, "LocalTag", user)
    mutations = [
        Mutation(
            i, f"m{i}", "LocalTag", f"t{i}", "insert", {"id": f"t{i}", "owner": "u1", "label": "x"}
        )
        for i in range(1, 9)
    ]

    req = SyncRequest(protocol=1, client_id="device", mutations=mutations)
    results = server.pusher.apply(user, req, server.schema.units["Push"]).results

    assert batches == [True]
    assert [r.status for r in results] == ["applied"] * 8
    with server.store.engine.connect() as conn:
        labels = {r[0] for r in conn.execute(sa.text("SELECT label FROM tag"))}
    assert labels == {"X"}


def _commits(store: Any, seconds: float, until: Any = None) -> int:
    """Commit 100 KB every 50 ms for ``seconds`` (or until ``until()``); the count."""
    import time

    with store.write() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS burst (b BLOB)")
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end and not (until and until()):
        with store.write() as conn:
            conn.exec_driver_sql("INSERT INTO burst VALUES (randomblob(100000))")
        n += 1
        time.sleep(0.05)
    return n


def _quiet_bounds(monkeypatch: Any, *, quiet: float, wait: float, hard: int) -> Any:
    from syncunit.server import sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "CHECKPOINT_BYTES", 50_000)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY_S", 0.0)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_QUIET_S", quiet)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_WAIT_S", wait)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_HARD_BYTES", hard)
    return sqlite_module


@pytest.mark.backends("sqlite")
def test_a_burst_of_commits_is_not_checkpointed_until_it_ends(store, monkeypatch):
    import time

    _quiet_bounds(monkeypatch, quiet=2.0, wait=60.0, hard=1 << 40)
    checkpointer = store._checkpointer

    assert _commits(store, 1.0) >= 5
    assert checkpointer.runs == 0  # every gap was shorter than the quiet time
    deadline = time.monotonic() + 20
    while checkpointer.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpointer.runs >= 1  # once it ended


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize(("wait", "hard"), [(0.3, 1 << 40), (60.0, 400_000)])
def test_a_long_burst_is_checkpointed_after_the_wait_or_past_the_hard_bound(
    store, monkeypatch, wait, hard
):
    """Under steady writes the WAL stays bounded: by time, or by size."""
    _quiet_bounds(monkeypatch, quiet=60.0, wait=wait, hard=hard)
    checkpointer = store._checkpointer

    _commits(store, 20.0, until=lambda: checkpointer.runs > 0)

    assert checkpointer.runs >= 1


@pytest.mark.backends("sqlite")
def test_the_servers_commits_reach_the_disk_before_it_answers(store):
    """``synchronous=FULL``: each commit syncs the WAL, so a push answered "applied"
    (the device then drops it) survives a power cut of the server's machine."""
    with store.write() as conn:
        level = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
    assert level == 2  # FULL
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2
