"""PostgreSQL under concurrent writers: no missed change, rules and pushes hold across processes.

Writers here are real concurrent transactions (psycopg connections of their
own); "server processes" are separate ``SyncServer`` instances, each with its
own engine, on one database (``test_workers`` runs real worker processes).
A store with a naive watermark (the highest version visible, as SQLite may
use) shows what the snapshot watermark prevents.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hospital.server import staff_auth
from hospital.units import schema as hospital_schema
from sqlalchemy.engine import Connection

from syncunit.client import SyncClient
from syncunit.errors import ProblemError
from syncunit.policies import Detect, MutationContext
from syncunit.server import SyncServer
from syncunit.server.migrations import LATEST
from syncunit.server.postgres import WRITTEN_IN, PostgresStore
from syncunit.server.store import ServerStore, tombstones
from syncunit.units import VERSION
from tests.conftest import pg_dsn
from tests.support import (
    appointments_of,
    assert_in_sync,
    final_cursors,
    local_keys,
    owned_table_server,
    raw_sync,
    removed_keys,
    sent_keys,
)

pytestmark = pytest.mark.backends("postgres")


class NaiveStore(PostgresStore):
    """The mistake: hand out the highest version visible in the snapshot as the cursor.

    Correct when writers commit in version order (SQLite); on PostgreSQL a
    transaction with a lower id can commit after it, and its rows are skipped.
    """

    def watermark(self, conn: Connection) -> int:
        tables = ["appointment", "doctor", "patient", "hospital", "syncunit_tombstones"]
        parts = " UNION ALL ".join(f"SELECT max({VERSION}) FROM {t}" for t in tables[:-1])
        parts += f" UNION ALL SELECT max(version) FROM {tables[-1]}"
        return int(conn.exec_driver_sql(f"SELECT coalesce(max(m), 0) FROM ({parts}) AS v(m)")
                   .scalar_one())  # fmt: skip


def _row(key: str, doctor_id: int = 1, minute: int = 0) -> dict[str, Any]:
    start = dt.datetime(2032, 1, 1, 8, 0) + dt.timedelta(minutes=minute)
    return {
        "id": key, "doctor_id": doctor_id, "patient_id": 1, "starts_at": start,
        "ends_at": start + dt.timedelta(minutes=5), "status": "booked", "room": "W", "notes": "",
    }  # fmt: skip


_INSERT = (
    "INSERT INTO appointment (id, doctor_id, patient_id, starts_at, ends_at, status, room, notes)"
    " VALUES (%(id)s, %(doctor_id)s, %(patient_id)s, %(starts_at)s, %(ends_at)s, %(status)s,"
    " %(room)s, %(notes)s)"
)


@contextmanager
def open_writer(url: str, row: dict[str, Any]) -> Iterator[psycopg.Connection[Any]]:
    """A transaction that has written ``row`` (so holds its transaction id) and is still open."""
    conn = psycopg.connect(pg_dsn(url))
    try:
        conn.execute(_INSERT, row)
        yield conn
    finally:
        conn.close()  # rolls back unless the test committed


def _write(url: str, row: dict[str, Any]) -> None:
    with psycopg.connect(pg_dsn(url)) as conn:
        conn.execute(_INSERT, row)


@pytest.fixture
def naive_server(store: ServerStore, server: SyncServer) -> SyncServer:
    """The hospital server, but handing out the naive watermark."""
    naive = NaiveStore(store.engine)
    return SyncServer(hospital_schema, naive, authenticate=staff_auth(store.engine))


# -- the race ---------------------------------------------------------------------------------


def _out_of_order_commit(server_url: str, db_url: str, client: SyncClient) -> set[str]:
    """A takes its id and stays open, B commits, the device syncs, A commits, it syncs again."""
    client.sync("Login")
    with open_writer(db_url, _row("writer-a", minute=1)) as a:
        _write(db_url, _row("writer-b", minute=2))
        client.sync("Login")
        assert "writer-a" not in local_keys(client, "LocalAppointment")  # not committed yet
        a.commit()
    client.sync("Login")
    return {"writer-a", "writer-b"} & local_keys(client, "LocalAppointment")


def test_a_writer_that_commits_last_with_an_older_id_is_not_missed(
    live, server_db_url, client, in_sync
):
    assert _out_of_order_commit(live.url, server_db_url, client) == {"writer-a", "writer-b"}
    in_sync(client, "Login")


def test_the_naive_watermark_misses_it(naive_server, serve, server_db_url, make_client):
    """The same race against the highest visible version as the cursor: A is lost for ever."""
    client = make_client(url=serve(naive_server.app).url, name="naive")
    assert _out_of_order_commit("", server_db_url, client) == {"writer-b"}
    client.sync("Login")
    assert "writer-a" not in local_keys(client, "LocalAppointment")


# -- removals when transaction ids are not the commit order ---------------------------------


@contextmanager
def _removing_while_the_doctor_moves_in(
    db_url: str, deleted: str, moved: str
) -> Iterator[psycopg.Connection[Any]]:
    """T1 deletes ``deleted`` and moves ``moved`` from doctor 2 to doctor 4 (both at
    hospital 2), and stays open; T2, with a later id, moves doctor 2 to hospital 1 and
    commits. Yields T1."""
    t1 = psycopg.connect(pg_dsn(db_url))
    try:
        t1.execute("DELETE FROM appointment WHERE id = %s", (deleted,))
        t1.execute("UPDATE appointment SET doctor_id = 4 WHERE id = %s", (moved,))
        with psycopg.connect(pg_dsn(db_url), autocommit=True) as t2:
            t2.execute("UPDATE doctor SET hospital_id = 1 WHERE id = 2")
        yield t1
    finally:
        t1.close()  # rolls back unless the test committed


@pytest.mark.parametrize("how", ["first copy", "delta", "reset", "snapshot file"])
def test_rows_removed_by_an_older_id_that_commits_after_a_newer_one_moved_them_in_leave(
    how, server, store, live, make_client, make_server, plain_sql, server_db_url, tmp_path,
    in_sync,
):  # fmt: skip
    """The device of hospital 1 gets doctor 2's appointments once T2 moved doctor 2
    there, while T1, whose id is older, still holds the delete of one and the move of
    another to hospital 2. When T1 commits, both must leave the device: just before T1,
    doctor 2 was already at hospital 1, although its tombstone's id is above T1's."""
    deleted, moved = appointments_of(store, 2, doctor_id=2)[:2]
    snap = make_server(snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1)
    if how == "snapshot file":
        live.app = snap.app
    device = make_client()
    if how in ("delta", "reset"):
        device.sync("Login")
        # A transaction that commits: the watermark passes the device's cursor (a delta at
        # an unchanged watermark finds nothing, and would wait for T1).
        plain_sql("SELECT pg_current_xact_id()")

    with _removing_while_the_doctor_moves_in(server_db_url, deleted, moved) as t1:
        if how == "reset":
            with store.write() as conn:
                store._set_fact(conn, "epoch", "another-database")
        if how == "snapshot file":
            for s in hospital_schema.units["Login"].streams:
                snap.snapshots.build(s, {"hospital_id": 1})
        got = device.sync("Login")
        assert {deleted, moved} <= local_keys(device, "LocalAppointment")
        assert ("appointments" in got.resets) == (how == "reset")
        assert bool(got.snapshots) == (how == "snapshot file")
        t1.commit()

    result = device.sync("Login")

    assert result.rows_removed["LocalAppointment"] == 2
    assert not {deleted, moved} & local_keys(device, "LocalAppointment")
    in_sync(device)


def test_a_row_removed_before_its_doctor_moved_in_is_named_to_nobody(
    server, store, live, plain_sql
):
    """The same writes one after the other: the delete committed before doctor 2 moved
    to hospital 1, so its key was never in hospital 1's scope and no removal names it
    (the move's tombstone shows the delete as committed when it was written)."""
    deleted, moved = appointments_of(store, 2, doctor_id=2)[:2]
    cursors = final_cursors(raw_sync(live.url, "Login", token="token-h1"))
    plain_sql.script(
        [
            f"DELETE FROM appointment WHERE id = '{deleted}'",
            f"UPDATE appointment SET doctor_id = 4 WHERE id = '{moved}'",
        ]
    )
    plain_sql("UPDATE doctor SET hospital_id = 1 WHERE id = 2")

    frames = raw_sync(live.url, "Login", token="token-h1", cursors=cursors)

    assert not {deleted, moved} & set(removed_keys(frames, "appointments"))
    assert set(sent_keys(frames, "appointments")) == set(appointments_of(store, 1, doctor_id=2))


def test_a_row_deleted_by_a_transaction_that_moved_its_doctor_after_a_newer_one_leaves(
    server, store, client, server_db_url, in_sync
):
    """T1 takes its id; T2 moves doctor 1 to hospital 2 and commits; T1 then moves doctor
    1 back and deletes one of its appointments. In id order doctor 1's tombstones read
    T1's change first, but T2's was made first: the doctor's state just before T1 is
    the one T2's tombstone keeps (hospital 1), and the appointment leaves the device."""
    client.sync("Login")
    gone = appointments_of(store, 1, doctor_id=1)[0]
    with psycopg.connect(pg_dsn(server_db_url)) as t1:
        t1.execute("SELECT pg_current_xact_id()")
        with psycopg.connect(pg_dsn(server_db_url), autocommit=True) as t2:
            t2.execute("UPDATE doctor SET hospital_id = 2 WHERE id = 1")
        t1.execute("UPDATE doctor SET hospital_id = 1 WHERE id = 1")
        t1.execute("DELETE FROM appointment WHERE id = %s", (gone,))

    client.sync("Login")

    assert gone not in local_keys(client, "LocalAppointment")
    in_sync(client)


# -- randomized: N writers with think time, a device syncing in a loop ------------------------


def _run_writers(db_url: str, client: SyncClient, *, writers: int, seconds: float) -> int:
    """Writers insert and update in scope while the device syncs; returns rows written."""
    stop = threading.Event()
    written: list[int] = []
    errors: list[BaseException] = []
    minutes = iter(range(1_000_000))
    lock = threading.Lock()

    def writer(n: int) -> None:
        rnd = random.Random(n)
        count = 0
        try:
            with psycopg.connect(pg_dsn(db_url)) as conn:
                while not stop.is_set():
                    with lock:
                        minute = next(minutes)
                    key = f"w{n}-{uuid.uuid4().hex[:8]}"
                    with conn.transaction():
                        conn.execute(
                            _INSERT, _row(key, doctor_id=1 + 2 * rnd.randrange(3), minute=minute)
                        )
                        if rnd.random() < 0.3:  # and touch an older row of the scope
                            conn.execute(
                                "UPDATE appointment SET notes = %s WHERE id = ("
                                " SELECT id FROM appointment WHERE doctor_id = 1"
                                " ORDER BY random() LIMIT 1)", (key,)
                            )  # fmt: skip
                        time.sleep(rnd.uniform(0, 0.03))  # think time, holding its id
                    count += 1
                    time.sleep(rnd.uniform(0, 0.01))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            written.append(count)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            client.sync("Login")
            time.sleep(0.06)  # under the server's 20 requests a second per principal
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    return sum(written)


def test_random_concurrent_writers_never_make_the_device_miss_a_row(
    live, server, server_db_url, client
):
    n = _run_writers(server_db_url, client, writers=6, seconds=3.0)
    assert n > 50
    client.sync("Login")
    assert_in_sync(server, client, "token-h1", "Login")


def test_random_concurrent_writers_defeat_the_naive_watermark(
    naive_server, serve, server_db_url, make_client
):
    """Shows the test above has teeth: with the naive cursor rows go missing for good."""
    client = make_client(url=serve(naive_server.app).url, name="naive")
    missing: set[str] = set()
    for _ in range(5):  # nearly always the first round; a bound, not a retry loop
        _run_writers(server_db_url, client, writers=6, seconds=2.0)
        client.sync("Login")
        with naive_server.store.engine.connect() as conn:
            on_server = {
                r[0] for r in conn.exec_driver_sql(
                    "SELECT a.id FROM appointment a JOIN doctor d ON d.id = a.doctor_id"
                    " WHERE d.hospital_id = 1"
                )
            }  # fmt: skip
        missing = on_server - local_keys(client, "LocalAppointment")
        if missing:
            break
    assert missing, "the naive watermark should have skipped rows committed out of order"


# -- rules and pushes across server processes ---------------------------------------------------


def _second_process(store: ServerStore, **options: Any) -> SyncServer:
    """Another server process on the same database: its own engine and store."""
    other = PostgresStore.from_url(store.engine.url.render_as_string(hide_password=False))
    return SyncServer(hospital_schema, other, authenticate=staff_auth(other.engine), **options)


SLOT = {
    "doctor_id": 1, "patient_id": 5, "starts_at": "2031-05-05T10:00:00",
    "ends_at": "2031-05-05T10:30:00", "status": "booked", "room": "R1", "notes": "",
}  # fmt: skip


def test_two_devices_booking_one_slot_through_two_processes_one_wins(
    server, store, serve, make_client, monkeypatch
):
    """Both rule checks run before either booking commits; exactly one booking survives."""
    import hospital.units as hu

    both_checked = threading.Barrier(2, timeout=5)

    def wait_for_the_other(ctx: MutationContext) -> str | None:
        # The loser's second attempt finds no partner: the barrier breaks, it goes on.
        with contextlib.suppress(threading.BrokenBarrierError):
            both_checked.wait()
        return None

    stream = hu.appointments
    monkeypatch.setattr(stream, "rules", [*stream.rules, wait_for_the_other])
    one, two = server, _second_process(store)
    a = make_client(url=serve(one.app).url, name="a")
    b = make_client("token-h1", url=serve(two.app).url, name="b")
    for c in (a, b):
        c.sync("Online")
        c.insert("LocalAppointment", dict(SLOT))
    results: dict[str, Any] = {}

    def push(name: str, c: SyncClient) -> None:
        results[name] = c.sync("Online")

    threads = [threading.Thread(target=push, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    applied = sorted(r.applied for r in results.values())
    rejected = [x for r in results.values() for x in r.rejected]
    assert applied == [0, 1], results
    assert len(rejected) == 1
    assert "already booked" in rejected[0]["reason"]
    with store.engine.connect() as conn:
        booked = conn.execute(
            sa.text("SELECT count(*) FROM appointment WHERE doctor_id = 1 AND starts_at = :s"),
            {"s": dt.datetime(2031, 5, 5, 10, 0)},
        ).scalar_one()
    assert booked == 1


def test_a_push_retried_on_another_process_applies_once(server, store, serve, make_client):
    """The first process applies the push and its answer is lost; the retry reaches another."""
    from tests.test_push_support import FaultTransport

    two = _second_process(store)
    urls = [serve(server.app).url, serve(two.app).url]
    fault = FaultTransport()
    first = make_client(url=urls[0], name="dev", transport=fault)
    first.sync("Online")
    key = first.insert("LocalAppointment", dict(SLOT))
    fault.lose_next()
    with pytest.raises(Exception):  # noqa: B017, PT011 - the lost response, whatever its class
        first.sync("Online")
    first.close()
    again = make_client(url=urls[1], name="dev")  # the same device, now behind process two

    result = again.sync("Online")

    assert result.applied == 1  # answered from the log: applied, once
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM appointment WHERE id = :k"), {"k": key})
        assert rows.scalar_one() == 1
        seqs = conn.execute(sa.text("SELECT count(*) FROM syncunit_mutations")).scalar_one()
    assert seqs == 1


def test_a_database_refusing_connections_is_a_503_the_device_retries(
    server, store, serve, make_client, server_db_url, caplog
):
    """The database down or restarting: no connection can be made (psycopg's error has
    no SQLSTATE). That is the database unavailable, a 503 the device retries and one
    log line, not a 500 with a traceback; the pending change goes out once it is back."""
    import logging

    device = make_client(url=serve(server.app).url, name="dev")
    device.sync("Online")
    key = device.insert("LocalAppointment", dict(SLOT))
    name = sa.make_url(server_db_url).database
    admin = psycopg.connect(pg_dsn(server_db_url.rsplit("/", 1)[0] + "/postgres"), autocommit=True)
    try:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        store.engine.dispose()  # connections the pool held are gone
        caplog.set_level(logging.INFO, logger="syncunit")
        with pytest.raises(ProblemError) as down:
            device.sync("Online")
        assert (down.value.status, down.value.code) == (503, "database-unavailable")
        assert down.value.retryable
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert device.outbox.pending()
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()
    assert device.sync("Online").applied == 1
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM appointment WHERE id = :k"), {"k": key})
        assert rows.scalar_one() == 1


def test_concurrent_pushes_of_one_client_to_two_processes_apply_once(server, store, serve):
    """The same request sent to two processes at the same instant: one applies, one replays."""
    from syncunit.protocol import Mutation
    from tests.test_push_support import post_sync

    two = _second_process(store)
    urls = [serve(server.app).url, serve(two.app).url]
    key = str(uuid.uuid4())
    m = Mutation(seq=1, id="m1", table="LocalAppointment", key=key, op="insert",
                 values={**SLOT, "id": key})  # fmt: skip
    codes: list[int] = []
    go = threading.Barrier(2, timeout=5)

    def send(url: str) -> None:
        go.wait()
        r = post_sync(url, "Online", token="token-h1", client_id="twin", mutations=[m])
        codes.append(r.status_code)

    threads = [threading.Thread(target=send, args=(u,)) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert codes == [200, 200]
    with store.engine.connect() as conn:
        count = sa.text("SELECT count(*) FROM appointment WHERE id = :k")
        assert conn.execute(count, {"k": key}).scalar_one() == 1
        last = sa.text("SELECT last_seq FROM syncunit_clients WHERE client_id = 'twin'")
        assert conn.execute(last).scalar_one() == 1


# -- the store's PostgreSQL-only duties -----------------------------------------------------


def test_truncate_resets_the_tables_streams(live, store, client, plain_sql, in_sync):
    client.sync("Login")
    assert local_keys(client, "LocalAppointment")
    with store.engine.connect() as conn:
        horizon = store.facts(conn).get("horizon")
    plain_sql("TRUNCATE appointment")

    result = client.sync("Login")

    assert "appointments" in result.resets
    assert local_keys(client, "LocalAppointment") == set()
    in_sync(client, "Login")
    # Only the streams that read the table: the doctors stream goes on with a delta.
    assert "doctors" not in result.resets
    assert result.rows_in.get("LocalDoctor", 0) == 0
    with store.engine.connect() as conn:
        assert store.facts(conn).get("horizon") == horizon


_GLOBAL_TRUNCATE = """CREATE OR REPLACE FUNCTION syncunit_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO syncunit_meta (key, value) VALUES ('horizon', pg_current_xact_id()::text::bigint)
  ON CONFLICT (key) DO UPDATE SET value = GREATEST(syncunit_meta.value::bigint,
                                                  EXCLUDED.value::bigint)::text;
  RETURN NULL;
END $$"""


def test_a_database_from_before_migration_3_truncates_per_table_once_started(
    store, plain_sql, server_db_url
):
    """Its TRUNCATE trigger moved the global horizon (every stream reset); the next
    start's migration gives it the one that moves only its table's."""
    assert store.install(hospital_schema)
    plain_sql(_GLOBAL_TRUNCATE)
    plain_sql("UPDATE syncunit_meta SET value = '2' WHERE key = 'schema-version'")
    plain_sql("TRUNCATE patient CASCADE")  # the old trigger: the global horizon moves
    with store.engine.connect() as conn:
        before = store.facts(conn)
    assert int(before["horizon"]) > 0

    assert store.install(hospital_schema)  # the migration (tracking itself is intact)
    plain_sql("TRUNCATE appointment")

    with store.engine.connect() as conn:
        facts = store.facts(conn)
    assert facts["schema-version"] == str(LATEST)
    assert facts["horizon"] == before["horizon"]
    assert int(facts["tracking:truncated:appointment"]) > int(before["horizon"])


_SYNCUNIT_TRIGGERS = (
    "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger"
    " WHERE NOT tgisinternal AND tgname LIKE 'syncunit%' ORDER BY 1, 2"
)


def test_a_database_from_before_migration_4_fires_its_triggers_always_once_started(
    store, plain_sql
):
    """Its triggers were enabled the ordinary way, which replica-mode writers skip; the
    next start's migration enables them ALWAYS, without re-installing (no stream resets)."""
    assert store.install(hospital_schema)
    triggers = plain_sql(_SYNCUNIT_TRIGGERS)
    assert {e for _, _, e in triggers} == {"A"}
    plain_sql.script(
        [f"ALTER TABLE {t} ENABLE TRIGGER {name}" for t, name, _ in triggers]
        + ["UPDATE syncunit_meta SET value = '3' WHERE key = 'schema-version'"]
    )
    with store.engine.connect() as conn:
        before = {k: v for k, v in store.facts(conn).items() if k.startswith("tracking:")}

    assert store.install(hospital_schema)

    assert plain_sql(_SYNCUNIT_TRIGGERS) == triggers
    with store.engine.connect() as conn:
        facts = store.facts(conn)
    assert facts["schema-version"] == str(LATEST)
    assert {k: v for k, v in facts.items() if k.startswith("tracking:")} == before
    assert not store.install(hospital_schema)  # intact: nothing more to do


#: The tombstone function before migration 5: no snapshot of the write.
_TOMBSTONE_WITHOUT_SNAPSHOT = """CREATE OR REPLACE FUNCTION syncunit_tombstone() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  old_row jsonb := to_jsonb(OLD);
  image jsonb := '{}'::jsonb;
BEGIN
  FOR i IN 1 .. TG_NARGS - 1 LOOP
    image := image || jsonb_build_object(TG_ARGV[i], old_row -> TG_ARGV[i]);
  END LOOP;
  INSERT INTO syncunit_tombstones (table_name, version, kind, old, at)
  VALUES (TG_ARGV[0], pg_current_xact_id()::text::bigint,
          CASE TG_OP WHEN 'DELETE' THEN 'delete' ELSE 'move' END, image::text,
          to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
  RETURN NULL;
END $$"""


def test_a_database_from_before_migration_5_keeps_snapshots_in_tombstones_once_started(
    server, store, client, plain_sql, in_sync
):
    """Its tombstones keep no snapshot of their write; the next start's migration
    replaces the function, without any stream resetting, and removals read the older
    tombstones in the order of their ids."""
    client.sync("Login")
    before, after = appointments_of(store, 1)[:2]
    plain_sql.script(
        [
            _TOMBSTONE_WITHOUT_SNAPSHOT,
            "UPDATE syncunit_meta SET value = '4' WHERE key = 'schema-version'",
        ]
    )
    plain_sql(f"DELETE FROM appointment WHERE id = '{before}'")
    with store.engine.connect() as conn:
        facts = {k: v for k, v in store.facts(conn).items() if k.startswith("tracking:")}

    assert store.install(hospital_schema)
    plain_sql(f"DELETE FROM appointment WHERE id = '{after}'")

    images = plain_sql("SELECT old FROM syncunit_tombstones ORDER BY id")
    assert [WRITTEN_IN in json.loads(old) for (old,) in images] == [False, True]
    with store.engine.connect() as conn:
        now = store.facts(conn)
    assert now["schema-version"] == str(LATEST)
    assert {k: v for k, v in now.items() if k.startswith("tracking:")} == facts
    result = client.sync("Login")
    assert result.resets == []
    assert result.rows_removed["LocalAppointment"] == 2
    in_sync(client)
    assert not store.install(hospital_schema)


def test_an_open_transaction_holds_the_watermark_and_shows_as_lag(server, store, server_db_url):
    """(The cluster is shared: other transactions may come and go; ours is held open.)"""
    assert isinstance(store, PostgresStore)
    with open_writer(server_db_url, _row("held")) as a:
        row = a.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        xid = int(row[0])
        time.sleep(0.05)
        _write(server_db_url, _row("after", minute=3))
        lag = store.watermark_lag()
        assert lag.watermark < xid  # held below the open writer
        assert lag.holder is not None
        assert lag.seconds >= 0.05
        assert lag.transactions >= 2
        assert store.current_version() < xid
    deadline = time.monotonic() + 30
    while store.current_version() < xid and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.current_version() >= xid  # released when it ended


def test_pruning_by_age_never_lifts_the_horizon_past_a_held_watermark(
    store, client, server_db_url, plain_sql, in_sync
):
    """A write transaction older than the retention (a forgotten prepared one, say) holds
    the watermark below tombstones recorded since: they may be old enough to prune, but
    a horizon above the watermark would reset every cursor handed out meanwhile, every
    sync a full download until that transaction ends. Deltas wait instead."""
    client.sync("Login")
    mine = appointments_of(store, 1)
    with open_writer(server_db_url, _row("held")):
        plain_sql(f"DELETE FROM appointment WHERE id IN ('{mine[0]}', '{mine[1]}')")
        held = store.current_version()

        horizon = store.prune_tombstones_before(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))

        assert horizon <= held
        for _ in range(2):
            result = client.sync("Login")
            assert result.resets == []
    deadline = time.monotonic() + 30  # the watermark moves once the writer is gone
    while store.current_version() < held + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.sync("Login").resets == []
    assert not {mine[0], mine[1]} & local_keys(client, "LocalAppointment")
    in_sync(client)


def test_pruning_deletes_in_small_batches_after_raising_the_horizon(
    server, store, plain_sql, monkeypatch
):
    import syncunit.server.postgres as pgmod

    monkeypatch.setattr(pgmod, "PRUNE_BATCH", 7)
    plain_sql("DELETE FROM appointment WHERE doctor_id IN (1, 2)")
    with store.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(tombstones)).scalar_one()
    assert n > 20
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda *a: statements.append(a[2]))  # fmt: skip

    horizon = store.prune_tombstones(0)

    deletes = [s for s in statements if s.startswith("DELETE FROM syncunit_tombstones")]
    assert len(deletes) == n // 7 + 1
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tombstones)).scalar_one() == 0
    with store.engine.connect() as conn:
        assert store.epoch_and_horizon(conn)[1] == horizon


def test_a_database_copied_into_another_refuses_to_start_until_renew_epoch(
    server, store, pg, make_server
):
    name = sa.make_url(store.engine.url).database
    store.engine.dispose()
    copy = pg.create_database("copy", template=str(name))
    copied = PostgresStore.from_url(pg.url(copy))
    from syncunit.errors import DatabaseRestored

    with pytest.raises(DatabaseRestored, match="renew-epoch"):
        SyncServer(hospital_schema, copied, authenticate=staff_auth(copied.engine))
    copied.renew_epoch()
    SyncServer(hospital_schema, copied, authenticate=staff_auth(copied.engine))
    copied.engine.dispose()


def test_many_devices_pushing_to_one_doctor_at_once_all_apply(server, store, serve, make_client):
    """Serializable pushes conflict often here (one doctor's bookings, read by the rule
    of each); retries and taking turns get every one applied, none twice."""
    two = _second_process(store)
    urls = [serve(server.app).url, serve(two.app).url]
    devices = [make_client(url=urls[i % 2], name=f"busy{i}") for i in range(8)]
    for d in devices:
        d.sync("Online")
    errors: list[BaseException] = []

    def run(i: int, d: SyncClient) -> None:
        try:
            for r in range(3):
                start = dt.datetime(2033, 1, 1, 8) + dt.timedelta(hours=i * 3 + r)
                ends = start + dt.timedelta(minutes=30)
                row = {**SLOT, "starts_at": start.isoformat(), "ends_at": ends.isoformat()}
                d.insert("LocalAppointment", row)
                d.sync("Online")  # (a background push may have taken the booking first)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, d)) for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert not errors, errors
    assert [r for d in devices for r in d.outbox.rejected()] == []
    assert all(d.outbox.count() == 0 for d in devices)  # every booking applied...
    with store.engine.connect() as conn:
        q = "SELECT count(*) FROM appointment WHERE starts_at >= '2033-01-01' AND doctor_id = 1"
        assert conn.execute(sa.text(q)).scalar_one() == 24  # ...once


def test_a_first_copy_streams_through_a_server_side_cursor(server, store):
    """The rows of a first copy are fetched chunk by chunk from a cursor on the server,
    never loaded whole into the server process."""
    from hospital.units import appointments

    from syncunit.server.changes import StreamReader

    reader = StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=16)
    with store.snapshot() as (conn, watermark):
        epoch, horizon = store.epoch_and_horizon(conn)
        frames = reader.frames(conn, watermark, epoch, horizon, None)
        try:
            start, first = next(frames), next(frames)
            assert start.total == 200
            assert len(first.data[0]) == 16
            open_cursors = conn.exec_driver_sql("SELECT count(*) FROM pg_cursors").scalar_one()
            assert open_cursors == 1
        finally:
            frames.close()
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_cursors").scalar_one() == 0


def test_tombstones_of_a_column_named_alike_in_two_tables_are_indexed_apart(
    store, serve, make_client
):
    """Each pinned column's index on tombstones casts old values of its own table only:
    another table's column of the same name holding text (here a name where the
    first holds a number) neither fails its deletes nor comes back from a lookup."""
    from syncunit import Stream, SyncSchema, SyncUnit
    from syncunit.server import Principal, TokenAuth

    meta = sa.MetaData()
    board = sa.Table(
        "board", meta, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner_id", sa.Integer, nullable=False), sa.Column("title", sa.String),
    )  # fmt: skip
    tag = sa.Table(
        "tag", meta, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner_id", sa.String, nullable=False), sa.Column("label", sa.String),
    )  # fmt: skip
    meta.create_all(store.engine)
    boards = Stream(
        "boards", board, {"id": board.c.id, "title": board.c.title},
        where=board.c.owner_id == sa.bindparam("user_id"), local_table="LocalBoard",
    )  # fmt: skip
    tags = Stream(
        "tags", tag, {"id": tag.c.id, "label": tag.c.label},
        where=tag.c.owner_id == sa.bindparam("user_name"), local_table="LocalTag",
    )  # fmt: skip
    ana = Principal("ana", {"user_id": 1, "user_name": "ana"})
    server = SyncServer(
        SyncSchema([SyncUnit("Pull", [boards, tags])]), store,
        authenticate=TokenAuth({"t-ana": ana}),
    )  # fmt: skip
    with store.engine.connect() as conn:
        names = {r[0] for r in conn.exec_driver_sql(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'syncunit_tombstones'"
        )}  # fmt: skip
    assert {"ix_syncunit_tombstones_board_owner_id", "ix_syncunit_tombstones_tag_owner_id"} <= names

    with store.engine.begin() as conn:
        conn.execute(board.insert(), [{"id": i, "owner_id": i % 2, "title": f"b{i}"}
                                      for i in range(1, 9)])  # fmt: skip
        conn.execute(tag.insert(), [{"id": i, "owner_id": "ana" if i % 2 else "rui",
                                     "label": f"t{i}"} for i in range(1, 9)])  # fmt: skip
    device = make_client("t-ana", url=serve(server.app).url)
    device.sync("Pull")
    assert local_keys(device, "LocalBoard") == {1, 3, 5, 7}
    assert local_keys(device, "LocalTag") == {1, 3, 5, 7}

    with store.engine.begin() as conn:  # text old values beside the numbers: no cast fails
        conn.execute(tag.delete().where(tag.c.id.in_([1, 2])))
        conn.execute(board.delete().where(board.c.id.in_([2, 3])))
        conn.execute(board.update().where(board.c.id == 5).values(owner_id=3))  # moves out
    device.sync("Pull")
    assert local_keys(device, "LocalBoard") == {1, 7}
    assert local_keys(device, "LocalTag") == {3, 5, 7}


# -- date and time values -----------------------------------------------------------------


def test_a_database_in_another_time_zone_syncs_date_times_in_utc(new_database, serve, tmp_path):
    """The database's ``TimeZone`` (here New York's) is not the sync's: keys come back
    in the form devices write them (a pulled row is edited, a pushed one comes back
    once), a value without an offset is UTC as on SQLite, and a time in the hour the
    clocks go back is its instant. The engine is the app's own, used before the server
    (its pooled connection opened in New York's zone)."""
    url = new_database("clock")
    with psycopg.connect(pg_dsn(url), autocommit=True) as admin:
        admin.execute(
            f"ALTER DATABASE {sa.make_url(url).database} SET timezone TO 'America/New_York'"
        )
    event = sa.Table(
        "event", sa.MetaData(),
        sa.Column("id", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("note", sa.String(50), nullable=True),
    )  # fmt: skip
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW TimeZone").scalar_one() == "America/New_York"
    server = owned_table_server(engine, event, "LocalEvent", "Events", policy=Detect(merge=False))
    with psycopg.connect(pg_dsn(url), autocommit=True) as backoffice:  # in New York's zone
        backoffice.execute(
            "INSERT INTO event (id, owner, at, note) VALUES"
            " ('2027-03-01 04:00:00-05', 'ana', '2027-11-07 01:30:00-05', 'from backoffice')"
        )
    device = SyncClient(serve(server.app).url, tmp_path / "events.sqlite", token="t")
    try:
        device.sync("Events")
        pulled = ("2027-03-01T09:00:00+00:00", "2027-11-07T06:30:00+00:00")
        assert device.store.query("SELECT id, at FROM LocalEvent") == [pulled]
        device.update("LocalEvent", pulled[0], {"note": "edited"})
        mine = "2027-03-02T09:00:00+00:00"
        device.insert("LocalEvent", {"id": mine, "owner": "ana", "at": "2027-03-02T09:00:00"})
        result = device.sync("Events")
        assert (result.applied, result.conflicts, result.rejected) == (2, [], [])
        device.sync("Events")
        assert device.store.query("SELECT id, at, note FROM LocalEvent ORDER BY id") == [
            (*pulled, "edited"),
            (mine, mine, None),
        ]
        with server.store.engine.connect() as conn:
            stored = conn.execute(sa.select(event.c.id, event.c.at).order_by(event.c.id)).all()
        instant = dt.datetime(2027, 3, 2, 9, tzinfo=dt.UTC)
        assert stored[1] == (instant, instant)
    finally:
        device.close()
        engine.dispose()


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_date_and_time_values_python_cannot_hold_reach_devices_and_go_back(
    new_database, serve, tmp_path, encoding
):
    """``infinity``, years BC or past 9999 and ``24:00:00``, written by a backoffice,
    travel as PostgreSQL's text, in every column type: the rows reach devices (a
    pull failed as a whole), are edited and deleted without conflicting with
    themselves, and the text pushed back is stored as the same value."""
    event = sa.Table(
        "event", sa.MetaData(),
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("owner", sa.String(20), nullable=False),
        sa.Column("d", sa.Date(), nullable=True),
        sa.Column("ts", sa.DateTime(), nullable=True),
        sa.Column("tstz", sa.DateTime(timezone=True), nullable=True),
        sa.Column("t", sa.Time(), nullable=True),
        sa.Column("note", sa.String(50), nullable=True),
    )  # fmt: skip
    url = new_database("odd")
    server = owned_table_server(url, event, "LocalEvent", "Events", policy=Detect(merge=False))
    rows = {
        "r0": ("infinity", "-infinity", "infinity", None),
        "r1": ("0044-03-15 BC", "0044-03-15 12:30:00.5 BC", "0044-03-15 12:30:00.5+00 BC", None),
        "r2": ("10000-01-01", "10000-01-01 00:00:00", "12000-01-01 01:00:00+00", "24:00:00"),
        "r3": ("2027-03-01", None, None, None),
    }
    with psycopg.connect(pg_dsn(url), autocommit=True) as backoffice:
        for key, values in rows.items():
            backoffice.execute(
                "INSERT INTO event (id, owner, d, ts, tstz, t) VALUES (%s, 'ana', %s, %s, %s, %s)",
                (key, *values),
            )
    device = SyncClient(
        serve(server.app).url, tmp_path / "odd.sqlite", token="t", encoding=encoding
    )
    local = "SELECT id, d, ts, tstz, t FROM LocalEvent WHERE id <> 'bad' ORDER BY id"
    try:
        device.sync("Events")
        assert device.store.query(local) == [(k, *v) for k, v in rows.items()]
        device.update("LocalEvent", "r0", {"note": "edited"})
        device.update("LocalEvent", "r1", {"note": "edited"})
        device.delete("LocalEvent", "r2")
        for key, copied in (("n1", "r1"), ("n2", "r2")):
            d, ts, tstz, t = rows[copied]
            device.insert(
                "LocalEvent", {"id": key, "owner": "ana", "d": d, "ts": ts, "tstz": tstz, "t": t}
            )
        device.insert("LocalEvent", {"id": "bad", "owner": "ana", "d": "44-03-15 BC"})
        result = device.sync("Events")
        assert (result.applied, result.conflicts) == (5, [])
        assert [(r["key"], r["code"]) for r in result.rejected] == [("bad", "invalid-value")]
        device.sync("Events")
        rows |= {"n1": rows["r1"], "n2": rows["r2"]}
        del rows["r2"]
        expected = [(k, *v) for k, v in sorted(rows.items())]
        assert device.store.query(local) == expected
        with psycopg.connect(pg_dsn(url)) as conn:
            conn.execute("SET TimeZone TO 'UTC'")
            stored = conn.execute(
                "SELECT id, d::text, ts::text, tstz::text, t::text FROM event ORDER BY id"
            ).fetchall()
        assert stored == expected
    finally:
        device.close()
        server.store.engine.dispose()
