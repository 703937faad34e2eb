"""A fresh device takes a snapshot file as its database, page by page.

What the device held before (the engine's tables, the app's own tables, views,
triggers, sequences, ``user_version``) is all there after, and the device is
what a row copy makes of it. Nothing another connection writes is lost: not at
the moment between the file's read of the device and the backup, and not
while the app commits all along. A device killed mid-install has the database
it had, and the next install removes the file it left.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncunit.client import adopt, bootstrap
from syncunit.server import Limits
from tests.support import appointments_of, assert_in_sync
from tests.test_snapshot_install import TABLE, outbox, spy_installs
from tests.test_snapshots import H1, _build


@pytest.fixture
def snap_server(make_server, live, tmp_path):
    server = make_server(snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1)
    live.app = server.app
    return server


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    return spy_installs(monkeypatch)


APP_SCHEMA = [
    "CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)",
    "CREATE INDEX notes_body ON notes (body)",
    "CREATE TABLE note_log (note_id INTEGER, at TEXT)",
    "CREATE TRIGGER notes_logged AFTER INSERT ON notes"
    " BEGIN INSERT INTO note_log VALUES (new.id, 'now'); END",
    "CREATE VIEW long_notes AS SELECT id FROM notes WHERE length(body) > 5",
    "CREATE TABLE tags (note_id INTEGER, tag TEXT, upper_tag TEXT AS (upper(tag)) STORED,"
    " PRIMARY KEY (note_id, tag)) WITHOUT ROWID",
]


def device_file(device: Any) -> Path:
    ((_, _, file),) = [r for r in device.store.query("PRAGMA database_list") if r[1] == "main"]
    return Path(file)


def whole_schema(device: Any) -> list[tuple[Any, ...]]:
    """Every object of the device's database but where its pages lie."""
    return device.store.query(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    )


def app_state(device: Any) -> dict[str, Any]:
    q = device.store.query
    return {
        "notes": q("SELECT * FROM notes ORDER BY id"),
        "log": q("SELECT * FROM note_log ORDER BY rowid"),
        "view": q("SELECT * FROM long_notes ORDER BY id"),
        "tags": q("SELECT * FROM tags ORDER BY note_id"),
        "sequence": q("SELECT * FROM sqlite_sequence WHERE name = 'notes'"),
        "user_version": q("PRAGMA user_version"),
        "application_id": q("PRAGMA application_id"),
    }


def test_a_fresh_device_takes_the_file_and_keeps_all_it_held(
    snap_server, make_client, copies, monkeypatch: pytest.MonkeyPatch
):
    levels: list[Any] = []  # the app's transactions are synced again after the install
    take = adopt.adopt

    def seeing_level(store: Any, *args: Any) -> int | None:
        taken = take(store, *args)
        levels.append(store.conn.execute("PRAGMA synchronous").fetchone()[0])
        return taken

    monkeypatch.setattr(adopt, "adopt", seeing_level)
    _build(snap_server)
    device = make_client()
    device.catalog()
    with device.store.atomic() as c:
        for stmt in APP_SCHEMA:
            c.execute(stmt)
        bodies = [("short",), ("a longer one",), ("the third",)]
        c.executemany("INSERT INTO notes (body) VALUES (?)", bodies)
        c.execute("DELETE FROM notes WHERE id = 3")  # the sequence is ahead of the rows
        c.execute("INSERT INTO tags (note_id, tag) VALUES (1, 'ward 3'), (2, 'urgent')")
    device.store.conn.execute("PRAGMA user_version = 7")
    device.store.conn.execute("PRAGMA application_id = 1234")
    before, held = app_state(device), whole_schema(device)

    result = device.sync("Login")

    assert (TABLE, "pages") in copies
    assert "appointments" in result.snapshots
    assert app_state(device) == before
    assert whole_schema(device) == held
    assert device.store.query("PRAGMA integrity_check") == [("ok",)]
    assert device.store.query("PRAGMA journal_mode") == [("wal",)]
    assert levels == [2, 2]  # FULL, for each of the unit's two streams
    assert_in_sync(snap_server, device, H1, "Login")
    with device.store.atomic() as c:  # the app's trigger and sequence go on
        c.execute("INSERT INTO notes (body) VALUES ('after')")
    assert device.store.query("SELECT max(id) FROM notes") == [(4,)]
    assert device.store.query("SELECT count(*) FROM note_log") == [(4,)]


def test_the_device_is_the_same_as_after_a_row_copy(
    snap_server, make_client, copies, monkeypatch: pytest.MonkeyPatch
):
    """Same objects, same SQL, same rows, same cursors, and the outbox records again."""
    _build(snap_server)
    by_pages = make_client(name="pages")
    by_pages.sync("Login")
    monkeypatch.setattr(adopt, "SMALL_DEVICE_PAGES", 0)
    monkeypatch.setattr(adopt, "MAX_DEVICE_SHARE", 0.0)
    by_rows = make_client(name="rows")
    by_rows.sync("Login")

    assert copies == [  # the largest file first: taken while the device holds little
        (TABLE, "pages"),
        ("LocalDoctor", "pages"),
        (TABLE, "transfer"),
        ("LocalDoctor", "transfer"),
    ]
    assert whole_schema(by_pages) == whole_schema(by_rows)
    for sql in (
        f'SELECT * FROM "{TABLE}" ORDER BY id',
        "SELECT * FROM syncunit_cursors ORDER BY stream",
        # (Each device is its own client, answered as the same principal.)
        "SELECT key, CASE key WHEN 'principal' THEN substr(value, instr(value, ' ')) ELSE value"
        " END FROM syncunit_local WHERE key != 'client_id' ORDER BY key",
    ):
        assert by_pages.store.query(sql) == by_rows.store.query(sql)
    key = by_pages.store.query(f'SELECT id FROM "{TABLE}" LIMIT 1')[0][0]
    by_pages.update(TABLE, key, {"notes": "after the install"})
    assert [(t, k, op) for t, k, op, _ in outbox(by_pages)] == [(TABLE, key, "update")]
    assert by_pages.sync("SendAppointments").applied == 1
    assert outbox(by_pages) == []


def test_a_write_by_another_connection_meanwhile_is_kept(
    snap_server, make_client, copies, monkeypatch: pytest.MonkeyPatch
):
    """The app writes through a connection of its own between the file's read of
    the device and the backup: the backup stands back, the rows are copied."""
    _build(snap_server)
    device = make_client()
    device.catalog()
    with device.store.atomic() as c:
        c.execute(APP_SCHEMA[0])
    ready = adopt._ready

    def app_writes_meanwhile(file: Any, stream: Any, offer: Any) -> int | str:
        seen = ready(file, stream, offer)
        if stream.local_table == TABLE:
            other = sqlite3.connect(device_file(device), isolation_level=None)
            other.execute("INSERT INTO notes (body) VALUES ('written meanwhile')")
            other.close()
        return seen

    monkeypatch.setattr(adopt, "_ready", app_writes_meanwhile)

    device.sync("Login")

    assert (TABLE, "transfer") in copies
    assert (TABLE, "pages") not in copies
    assert device.store.query("SELECT body FROM notes") == [("written meanwhile",)]
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_table_with_an_index_of_the_app_keeps_it(snap_server, make_client, copies):
    """The file's indexes are the stream's; the app's own would be lost with the
    device's table, so the rows are copied into it instead."""
    _build(snap_server)
    device = make_client()
    device.catalog()
    with device.store.atomic() as c:
        c.execute(f'CREATE INDEX app_by_notes ON "{TABLE}" (notes)')

    device.sync("Login")

    assert (TABLE, "pages") not in copies
    assert device.store.query("SELECT name FROM sqlite_master WHERE name = 'app_by_notes'") == [
        ("app_by_notes",)
    ]
    assert_in_sync(snap_server, device, H1, "Login")


#: A device process that dies in the middle of the page install, its pages
#: partly copied and (with a two-page cache) partly spilled into the WAL.
DIES_MID_INSTALL = """
import os, signal, sys
from syncunit.client import SyncClient, adopt

class Dying:
    def __init__(self, file):
        self.file = file
    def execute(self, *args):
        return self.file.execute(*args)
    def backup(self, target, *, pages, progress):
        calls = [0]
        def dying(*args):
            progress(*args)
            calls[0] += 1
            if calls[0] == 3:
                print("killed with pages left:", args[1], flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        target.execute("PRAGMA cache_size = 2")
        return self.file.backup(target, pages=pages, progress=dying)

install = adopt._install
adopt._install = lambda file, *rest: install(Dying(file), *rest)
adopt.STEP_PAGES = 2
device = SyncClient(sys.argv[1], sys.argv[2], token="token-h1")
device.catalog()
with device.store.atomic() as c:
    c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    c.execute("INSERT INTO notes VALUES (1, 'kept')")
device.sync("Login")
print("the sync finished: the test meant to kill it first")
"""


def test_a_device_killed_mid_install_is_as_it_was_and_syncs(snap_server, make_client, live):
    """SIGKILL while the backup has copied some pages: the database is the one
    before the install (the backup commits once), and the next sync completes."""
    _build(snap_server)
    path = Path(make_client(name="probe").store.conn.execute("PRAGMA database_list").fetchone()[2])
    device_path = path.with_name("killed.sqlite")
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "examples")])}
    proc = subprocess.run(
        [sys.executable, "-c", DIES_MID_INSTALL, live.url, str(device_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert int(proc.stdout.split("pages left:")[1]) > 0  # mid-copy, not after it

    left = list(device_path.parent.glob(".syncunit-snapshot-*.sqlite"))
    assert left  # the killed install's decompressed file
    device = make_client(name="killed")
    assert device.store.query("PRAGMA integrity_check") == [("ok",)]
    assert device.store.query("SELECT * FROM notes") == [(1, "kept")]
    assert device.store.query(f'SELECT count(*) FROM "{TABLE}"') == [(0,)]
    assert ("appointments",) not in device.store.query("SELECT stream FROM syncunit_cursors")
    assert "appointments" in device.sync("Login").snapshots
    assert_in_sync(snap_server, device, H1, "Login")
    assert device.store.query("SELECT * FROM notes") == [(1, "kept")]
    assert not any(p.exists() for p in left)  # swept by the next install


def test_a_sweep_removes_what_no_install_holds(tmp_path):
    """Two clients may share a folder: a file another install holds stays."""
    fd, held = bootstrap.scratch(tmp_path)
    left = tmp_path / f"{bootstrap.SCRATCH}left-by-a-killed-run.sqlite"
    left.write_bytes(b"pages")
    part = tmp_path / f"{bootstrap.SCRATCH}0123.part"  # a download to resume: not swept
    part.write_bytes(b"compressed")
    try:
        bootstrap.sweep(tmp_path)
        assert held.exists()
        assert not left.exists()
        assert part.exists()
    finally:
        os.close(fd)
    bootstrap.sweep(tmp_path)
    assert not held.exists()  # its holder let go


class Writer(threading.Thread):
    """The app committing a row every few milliseconds through a connection of its own."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.committed: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        while not self.done.wait(0.002):
            body = f"meanwhile {len(self.committed)}"  # not its id: a lost row's is used again
            conn.execute("INSERT INTO notes (body) VALUES (?)", (body,))
            self.committed.append(body)
        conn.close()


def test_an_app_writing_all_along_on_its_own_connection_loses_nothing(
    snap_server, make_client, copies
):
    """No injected moment: the app commits all along through a connection of its
    own while fresh devices take the files; every commit is there after."""
    _build(snap_server)
    for n in range(4):
        device = make_client(name=f"busy{n}")
        device.catalog()
        with device.store.atomic() as c:
            c.execute(APP_SCHEMA[0])
        writer = Writer(device_file(device))
        writer.start()
        try:
            device.sync("Login")
        finally:
            writer.done.set()
            writer.join()
        assert writer.committed
        assert device.store.query("SELECT body FROM notes ORDER BY id") == [
            (body,) for body in writer.committed
        ]
        assert_in_sync(snap_server, device, H1, "Login")


def test_a_file_with_other_index_names_is_copied_not_taken(
    snap_server, make_client, copies, monkeypatch: pytest.MonkeyPatch
):
    """An older server named a file's indexes after its table ``rows``: taken as
    the database, the device would hold indexes it cannot find by name."""
    from syncunit.server import snapshots

    ddl = snapshots.local_table_ddl

    def older(info: Any, table: str | None = None) -> list[str]:
        return [s.replace(f"ix_{info.local_table}_", "ix_rows_") for s in ddl(info, table)]

    monkeypatch.setattr(snapshots, "local_table_ddl", older)
    _build(snap_server)
    device = make_client()
    device.catalog()
    before = whole_schema(device)

    device.sync("Login")

    assert (TABLE, "transfer") in copies
    assert (TABLE, "pages") not in copies
    assert whole_schema(device) == before
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_row_the_app_writes_just_before_the_file_reads_the_device_is_kept(
    snap_server, make_client, copies, monkeypatch: pytest.MonkeyPatch
):
    """The checks that the table is empty are made in the read snapshot the file
    copies from: a row written before it is seen (the file's table would replace
    it), one written after it is caught by the backup's check."""
    _build(snap_server)
    device = make_client()
    device.catalog()
    ready = adopt._ready

    def app_writes_first(file: Any, *rest: Any) -> int | str:
        if any(getattr(arg, "local_table", None) == TABLE for arg in rest):
            other = sqlite3.connect(device_file(device), isolation_level=None)
            other.execute(
                f'INSERT INTO "{TABLE}" (id, doctor_id, notes) VALUES (?, 1, ?)',
                ("written-first", "by the app"),
            )
            other.close()
        return ready(file, *rest)

    monkeypatch.setattr(adopt, "_ready", app_writes_first)

    device.sync("Login")

    assert (TABLE, "pages") not in copies
    assert device.store.query(f'SELECT notes FROM "{TABLE}" WHERE id = ?', ("written-first",)) == [
        ("by the app",)
    ]
    assert [(t, k, op) for t, k, op, _ in outbox(device)] == [(TABLE, "written-first", "insert")]


# -- pages and rows make the same device, whatever it held ------------------------------------

#: What a device may have done before its first sync: the app's own tables, rows,
#: views, indexes, settings, and rows of the local table written offline (a key the
#: server also has among them).
ops = st.lists(
    st.one_of(
        st.tuples(st.just("table"), st.integers(0, 2)),
        st.tuples(st.just("row"), st.integers(0, 2), st.text(max_size=8)),
        st.tuples(st.just("forget"), st.integers(0, 2)),
        st.tuples(st.just("view"), st.integers(0, 2)),
        st.tuples(st.just("index"), st.integers(0, 2)),
        st.tuples(st.just("user_version"), st.integers(0, 2**31 - 1)),
        st.tuples(st.just("offline"), st.sampled_from(["new-1", "new-2", "server"])),
    ),
    max_size=12,
)


def _do(device: Any, steps: list[tuple[Any, ...]], server_key: str) -> None:
    tables: set[int] = set()
    written: set[str] = set()
    for step in steps:
        kind, arg = step[0], step[1]
        with device.store.atomic() as c:
            if kind == "table" and arg not in tables:
                c.execute(f"CREATE TABLE app{arg} (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
                tables.add(arg)
            elif kind == "row" and arg in tables:
                c.execute(f"INSERT INTO app{arg} (v) VALUES (?)", (step[2],))
            elif kind == "forget" and arg in tables:
                c.execute(f"DELETE FROM app{arg} WHERE id = (SELECT max(id) FROM app{arg})")
            elif kind in ("view", "index") and arg in tables:
                made = "VIEW" if kind == "view" else "INDEX"
                on = f"AS SELECT v FROM app{arg}" if kind == "view" else f"ON app{arg} (v)"
                c.execute(f"CREATE {made} IF NOT EXISTS app{arg}_{kind} {on}")
            elif kind == "user_version":
                c.execute(f"PRAGMA user_version = {arg}")
        key = server_key if arg == "server" else arg
        if kind == "offline" and key not in written:
            device.insert(TABLE, {"id": key, "doctor_id": 1, "notes": "written offline"})
            written.add(key)


def _device_state(device: Any) -> dict[str, Any]:
    q = device.store.query
    apps = [r[0] for r in q("SELECT name FROM sqlite_master WHERE name LIKE 'app_' ESCAPE '\\'")]
    return {
        "schema": whole_schema(device),
        "apps": {name: q(f"SELECT * FROM {name} ORDER BY id") for name in apps},
        "sequence": q("SELECT * FROM sqlite_sequence ORDER BY name"),
        "user_version": q("PRAGMA user_version"),
        "rows": q(f'SELECT * FROM "{TABLE}" ORDER BY id'),
        "doctors": q('SELECT * FROM "LocalDoctor" ORDER BY id'),
        "outbox": [(t, k, op) for t, k, op, _ in outbox(device)],
        "cursors": q("SELECT * FROM syncunit_cursors ORDER BY stream"),
    }


@pytest.fixture
def many_devices_server(make_server, live, tmp_path):
    """A snapshot server for many devices in a row: built once, not rate-limited."""
    unlimited = Limits(requests_per_second=1e9, request_burst=10**9)
    server = make_server(snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1, limits=unlimited)
    live.app = server.app
    _build(server)
    return server


@settings(
    max_examples=int(os.environ.get("SYNCUNIT_PAGES_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=ops)
def test_pages_and_rows_make_the_same_device_whatever_it_held(
    many_devices_server, make_client, steps
):
    """The page install is only a faster way: for any device, what it ends with is
    what copying the rows gives (the same decision to keep offline rows included)."""
    server_key = appointments_of(many_devices_server.store, 1)[0]
    example = uuid.uuid4().hex[:8]
    states = []
    for how in ("pages", "rows"):
        with pytest.MonkeyPatch.context() as mp:
            if how == "rows":
                mp.setattr(adopt, "SMALL_DEVICE_PAGES", 0)
                mp.setattr(adopt, "MAX_DEVICE_SHARE", 0.0)
            device = make_client(name=f"{how}-{example}")
            device.catalog()
            _do(device, steps, server_key)
            device.sync("Login")
            states.append(_device_state(device))
            device.close()
    assert states[0] == states[1]


def test_the_backup_reads_the_file_mapped(snap_server, make_client, copies, monkeypatch):
    """Fewer read calls for the pages copied (64-bit systems only)."""
    mapped: list[int] = []
    install = adopt._install

    def seeing(file: Any, *rest: Any) -> None:
        mapped.append(file.execute("PRAGMA mmap_size").fetchone()[0])
        install(file, *rest)

    monkeypatch.setattr(adopt, "_install", seeing)
    _build(snap_server)
    make_client().sync("Login")
    assert (TABLE, "pages") in copies
    want = adopt.MAP_BYTES if sys.maxsize > 2**32 else 0
    assert mapped == [want, want]  # the unit's two streams
