"""A first copy defers its local indexes for speed; whatever ends it, the device is whole.

A large first copy drops the local table's secondary indexes and builds them
once at its end. A process killed in the middle never reaches that end: the
suspension is recorded in the local database, so reopening it, or the copy's
last chunk in a later run, builds them again.

On the server, a SQLite store reads a first copy through a memory map (fewer
read calls for a long walk), and only a first copy: a delta's few cold pages
read faster without.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import pytest

from syncunit.client.store import INDEX_BUILD_CACHE_KIB, LocalStore
from syncunit.client.triggers import trigger_names
from syncunit.protocol import Chunk

KILLED_LATE_IN_LOGIN = """
import os, signal, sys
import syncunit.client.client as client_module
from syncunit.client import SyncClient
from syncunit.client.store import LocalStore

url, path = sys.argv[1:3]
client_module.DEFER_INDEXES_ABOVE = 50  # the test's copy is small: defer anyway
applied = 0
apply_chunk = LocalStore.apply_chunk

def apply_then_die(self, stream, chunk):
    global applied
    out = apply_chunk(self, stream, chunk)
    if stream.local_table == "LocalAppointment":
        applied += 1
        if applied == 10:  # of 13: late in the copy, its last chunks still to come
            os.kill(os.getpid(), signal.SIGKILL)
    return out

LocalStore.apply_chunk = apply_then_die
SyncClient(url, path, token="token-h1", chunk_size=16).sync("Login")
print("the sync finished: the test meant to kill it first")
"""


def _recording(store: LocalStore) -> bool:
    """The outbox triggers are all there and not quieted: the app's writes are recorded."""
    triggers = store.query(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'LocalAppointment'"
    )
    want = sorted(trigger_names("LocalAppointment"))
    return sorted(t[0] for t in triggers) == want and store.query(
        "SELECT applying FROM syncunit_state"
    ) == [(0,)]


def _indexes(store: LocalStore, table: str) -> set[str]:
    return {r[1] for r in store.query(f'PRAGMA index_list("{table}")')}


def test_a_first_copy_killed_late_leaves_the_device_whole(live, make_client, tmp_path, in_sync):
    path = tmp_path / "killed.sqlite"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_LATE_IN_LOGIN, live.url, str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    device = make_client(name="killed")  # the same database, reopened
    catalog = device.store.catalog()
    info = catalog.stream("appointments")
    want = {f"ix_LocalAppointment_{'_'.join(ix)}" for ix in info.indexes}
    assert want <= _indexes(device.store, "LocalAppointment")
    device.sync("Login")  # resumes the copy: its last chunks
    assert want <= _indexes(device.store, "LocalAppointment")
    in_sync(device)


def test_the_copys_last_chunk_restores_what_it_suspended(client):
    client.sync("Login")
    store: LocalStore = client.store
    info = store.catalog().stream("appointments")
    assert store.suspend_indexes(info)
    assert not {f"ix_LocalAppointment_{'_'.join(ix)}" for ix in info.indexes} & _indexes(
        store, "LocalAppointment"
    )
    cursor = store.cursors(["appointments"])["appointments"]
    store.apply_chunk(info, Chunk("appointments", [], [], [], cursor, complete=True))
    want = {f"ix_LocalAppointment_{'_'.join(ix)}" for ix in info.indexes}
    assert want <= _indexes(store, "LocalAppointment")


def test_suspended_indexes_are_built_in_a_larger_page_cache_given_back_after(client):
    client.sync("Login")
    store: LocalStore = client.store
    info = store.catalog().stream("appointments")
    assert store.suspend_indexes(info)
    before = store.query("PRAGMA cache_size")[0][0]
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    try:
        store.restore_indexes(info)
    finally:
        store.conn.set_trace_callback(None)

    builds = [i for i, sql in enumerate(statements) if sql.startswith("CREATE INDEX")]
    grow = statements.index(f"PRAGMA cache_size = {-INDEX_BUILD_CACHE_KIB}")
    back = statements.index(f"PRAGMA cache_size = {before}")
    assert len(builds) == len(info.indexes)
    assert grow < min(builds)  # every index built in the larger cache
    assert max(builds) < back
    assert store.query("PRAGMA cache_size")[0][0] == before


def test_the_server_maps_its_file_for_a_first_copy_and_only_then(
    backend, server, live, make_client, plain_sql, monkeypatch
):
    if backend != "sqlite":
        pytest.skip("the memory map is SQLite's")
    from syncunit.server import changes
    from syncunit.server.sqlite import MMAP_BYTES

    walks: list[tuple[str, int, Any]] = []  # stream, mmap_size while it reads, DB-API conn
    partitions = changes.StreamReader._partitions

    def spy(self: changes.StreamReader, conn: Any, *args: Any, **kw: Any) -> Any:
        size = conn.exec_driver_sql("PRAGMA mmap_size").scalar()
        walks.append((self.stream.name, size, conn.connection.dbapi_connection))
        return partitions(self, conn, *args, **kw)

    monkeypatch.setattr(changes.StreamReader, "_partitions", spy)
    device = make_client()
    device.sync("Login")
    copy = [size for name, size, _ in walks if name == "appointments"]
    assert copy == [MMAP_BYTES] * len(copy) != []
    # Back in the pool, the connection reads without the map again.
    assert {raw.execute("PRAGMA mmap_size").fetchone()[0] for *_, raw in walks} == {0}

    walks.clear()
    server.store.engine.dispose()  # the delta on a connection no first copy has used
    with plain_sql.transaction() as run:
        run(
            "UPDATE appointment SET notes = 'x' WHERE id IN (SELECT a.id FROM appointment a"
            " JOIN doctor d ON d.id = a.doctor_id WHERE d.hospital_id = 1 LIMIT 3)"
        )
    assert device.sync("Login").rows_in.get("LocalAppointment") == 3
    delta = [size for name, size, _ in walks if name == "appointments"]
    assert delta == [0] * len(delta) != []


@pytest.mark.parametrize("bulk", [True, False], ids=["triggers-swapped", "flag"])
def test_a_copy_inserts_its_new_rows_and_merges_over_a_row_already_there(
    client, tmp_path, monkeypatch, bulk
):
    from syncunit.client import applying

    if bulk:  # the test's chunks are small: swap the triggers for them anyway
        monkeypatch.setattr(applying, "BULK_ROWS", 1)
    client.sync("Login")
    catalog = client.store.catalog()
    info = catalog.stream("appointments")
    columns = [c.name for c in info.columns]
    names = ", ".join(f'"{c}"' for c in columns)
    rows = client.store.query(f'SELECT {names} FROM "LocalAppointment" ORDER BY id LIMIT 5')
    store = LocalStore(tmp_path / "fresh.sqlite")
    store.apply_catalog(catalog)
    store.copying.add(info.name)
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)

    def chunk(part: list[tuple[Any, ...]]) -> Chunk:
        return Chunk(info.name, columns, [list(c) for c in zip(*part, strict=True)], [], "c")

    # All new: plain INSERTs.
    assert store.apply_chunk(info, chunk(rows[:3])) == (3, 0)
    inserts = [s for s in statements if s.startswith('INSERT INTO "LocalAppointment"')]
    assert inserts
    assert not any("ON CONFLICT" in s for s in inserts)
    assert _recording(store)

    # One key there already (written since the copy began): the chunk merges instead.
    statements.clear()
    notes = columns.index("notes")
    again = [*rows[2][:notes], "changed on the server", *rows[2][notes + 1 :]]
    assert store.apply_chunk(info, chunk([tuple(again), *rows[3:]])) == (3, 0)
    assert any("ON CONFLICT" in s for s in statements)
    store.conn.set_trace_callback(None)
    got = store.query(f'SELECT {names} FROM "LocalAppointment" ORDER BY id')
    assert got == [*rows[:2], tuple(again), *rows[3:]]

    # Nothing the engine wrote is a local change, and the app's writes still are.
    assert store.query("SELECT count(*) FROM syncunit_outbox") == [(0,)]
    assert _recording(store)
    with store.atomic() as c:
        c.execute(
            'UPDATE "LocalAppointment" SET notes = ? WHERE id = ?', ("by the app", rows[0][0])
        )
        c.execute('DELETE FROM "LocalAppointment" WHERE id = ?', (rows[1][0],))
        c.execute(
            f'INSERT INTO "LocalAppointment" ({names}) VALUES ({", ".join("?" * len(columns))})',
            ("new-by-the-app", *rows[0][1:]),
        )
    ops = store.query("SELECT row_key, op FROM syncunit_outbox ORDER BY row_key")
    assert sorted(ops) == sorted(
        [(rows[0][0], "update"), (rows[1][0], "delete"), ("new-by-the-app", "insert")]
    )
    store.close()
