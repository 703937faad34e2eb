"""Installing a snapshot file on the device: SQLite's transfer copy, and what the device holds.

An empty local table takes the file's records and index entries as stored
(the file has exactly the local table's DDL and indexes); the engine's
triggers are off for the copy only; rows with unpushed changes and rows a
subscription holds come through; anything unusual falls back to a plain copy
or to row by row, never to a wrong table. (A fresh device takes the file's
pages instead: ``test_snapshot_pages``.)
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import zstandard
from hospital.models import appointment

from syncunit.client import adopt, bootstrap
from syncunit.client.triggers import trigger_names
from syncunit.errors import LocalStoreError
from syncunit.protocol import SnapshotOffer
from tests.support import appointments_of, assert_in_sync, local_keys
from tests.test_snapshots import H1, _build

TABLE = "LocalAppointment"
QUIET_ON = "UPDATE syncunit_state SET applying = 1 WHERE id = 1"
QUIET_OFF = "UPDATE syncunit_state SET applying = 0 WHERE id = 1"


@pytest.fixture
def snap_server(make_server, live, tmp_path):
    server = make_server(snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1)
    live.app = server.app
    return server


def spy_installs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(local table, how) of every snapshot install that succeeds from now on:
    "pages" (the file became the database), "transfer" (records copied as
    stored) or "upsert" (rows through the table's triggers). A failed one falls
    back to row by row, which would hide a wrong copy."""
    seen: list[tuple[str, str]] = []
    pages, rows = adopt.adopt, bootstrap._copy

    def adopt_spy(store: Any, stream: Any, path: Any, offer: Any) -> int | None:
        taken = pages(store, stream, path, offer)
        if taken is not None:
            seen.append((stream.local_table, "pages"))
        return taken

    def copy_spy(store: Any, stream: Any, offer: Any, *, transfer: bool) -> int:
        taken = rows(store, stream, offer, transfer=transfer)
        seen.append((stream.local_table, "transfer" if transfer else "upsert"))
        return taken

    monkeypatch.setattr(adopt, "adopt", adopt_spy)
    monkeypatch.setattr(bootstrap, "_copy", copy_spy)
    return seen


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    return spy_installs(monkeypatch)


@pytest.fixture(params=["pages", "transfer"])
def fresh_install(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How a fresh device's empty table takes a file: both ways (the second is what a
    device that holds more than the file's quarter does)."""
    if request.param == "transfer":
        monkeypatch.setattr(adopt, "SMALL_DEVICE_PAGES", 0)
        monkeypatch.setattr(adopt, "MAX_DEVICE_SHARE", 0.0)
    return str(request.param)


def schema_of(device: Any, table: str = TABLE) -> list[tuple[Any, ...]]:
    """The table's indexes and triggers, the temporary ones too, with their SQL."""
    sql = "SELECT type, name, sql FROM {}.sqlite_master WHERE tbl_name = ? ORDER BY name"
    return [
        (schema, *row)
        for schema in ("main", "temp")
        for row in device.store.query(sql.format(schema), (table,))
    ]


def outbox(device: Any) -> list[tuple[Any, ...]]:
    return device.store.query("SELECT table_name, row_key, op, changed FROM syncunit_outbox")


def put_quietly(device: Any, key: str, notes: str) -> None:
    """A row the device holds without a change to push (kept from an earlier session)."""
    with device.store.atomic() as c:
        c.execute(QUIET_ON)
        c.execute(f'INSERT INTO "{TABLE}" (id, doctor_id, notes) VALUES (?, 1, ?)', (key, notes))
        c.execute(QUIET_OFF)


def test_an_empty_table_takes_the_file_as_stored_with_its_indexes_and_triggers(
    snap_server, make_client, copies, fresh_install
):
    _build(snap_server)
    device = make_client()
    device.catalog()
    before = schema_of(device)
    assert [r[1] for r in before].count("index") == 3  # the key's, and two of the stream's
    assert [r[1] for r in before].count("trigger") == len(trigger_names(TABLE))

    result = device.sync("Login")

    assert "appointments" in result.snapshots
    assert (TABLE, fresh_install) in copies
    assert schema_of(device) == before  # indexes and outbox triggers as they were
    assert device.store.query("PRAGMA integrity_check") == [("ok",)]  # indexes hold every row
    assert outbox(device) == []  # the copy recorded nothing to push
    plan = device.store.query(
        f'EXPLAIN QUERY PLAN SELECT id FROM "{TABLE}" WHERE doctor_id = 1 AND starts_at > ?',
        ("2020",),
    )
    assert "ix_LocalAppointment_doctor_id_starts_at" in str(plan)
    assert_in_sync(snap_server, device, H1, "Login")
    key = appointments_of(snap_server.store, 1)[0]
    device.update(TABLE, key, {"notes": "after the copy"})  # the triggers record again
    assert [(t, k, op) for t, k, op, _ in outbox(device)] == [(TABLE, key, "update")]


def _vm_steps(conn: Any, run: Any) -> int:
    """SQLite virtual machine instructions ``run`` executes on ``conn`` (to within 100)."""
    ticks = [0]

    def tick() -> int:
        ticks[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        run()
    finally:
        conn.set_progress_handler(None, 0)
    return ticks[0] * 100


def test_sqlite_copies_records_without_decoding_them(snap_server, make_client, tmp_path):
    """The transfer path runs a few instructions per row; decoding and encoding
    each row (what a trigger forces) runs many times more."""
    snap = next(s for s in _build(snap_server) if s.stream == "appointments")
    offer = SnapshotOffer("appointments", "", snap.size, snap.sha256, snap.rows, snap.cursor)
    plain = tmp_path / "plain.sqlite"
    with snap.path.open("rb") as src, plain.open("wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    steps = {}
    for name, app_trigger in (("transfer", False), ("decoded", True)):
        device = make_client(name=name)
        device.catalog()
        if app_trigger:
            device.store.conn.execute(
                f'CREATE TRIGGER app_seen AFTER INSERT ON "{TABLE}" BEGIN SELECT 1; END'
            )
        info = device.store.catalog().stream("appointments")
        store = device.store
        steps[name] = _vm_steps(
            store.conn, lambda s=store, i=info: bootstrap.copy_rows(s, i, plain, offer)
        )
        assert device.store.query(f'SELECT count(*) FROM "{TABLE}"') == [(snap.rows,)]
    assert snap.rows > 100
    # 200 rows: about 3,600 against 16,000 (most of the 3,600 is the statements around it)
    assert steps["transfer"] * 3 < steps["decoded"], steps


def test_rows_with_unpushed_changes_come_through_the_transfer(
    snap_server, make_client, store, copies
):
    _build(snap_server)
    device = make_client()
    device.catalog()
    edited, deleted = appointments_of(store, 1)[:2]
    put_quietly(device, edited, "as the server had it")
    put_quietly(device, deleted, "as the server had it")
    device.update(TABLE, edited, {"notes": "changed here"})
    device.delete(TABLE, deleted)
    new = device.insert(TABLE, {"doctor_id": 1, "patient_id": 7, "notes": "mine"})
    waiting = outbox(device)
    assert len(waiting) == 3

    device.sync("Login")

    assert (TABLE, "transfer") in copies
    notes = dict(device.store.query(f'SELECT id, notes FROM "{TABLE}"'))
    assert notes[edited] == "changed here"  # pulls never clobber a pending change
    assert deleted not in notes  # nor bring back a row deleted here
    assert notes[new] == "mine"
    assert set(notes) == set(appointments_of(store, 1)) - {deleted} | {new}
    assert outbox(device) == waiting
    assert device.store.query("PRAGMA integrity_check") == [("ok",)]


def test_a_first_copy_from_a_file_drops_rows_no_longer_in_scope(snap_server, make_client, copies):
    """As a first copy row by row does: what the device held from before goes."""
    _build(snap_server)
    device = make_client()
    device.catalog()
    put_quietly(device, "0190a000-0000-7000-8000-00000000dead", "pushed, then moved away")

    device.sync("Login")

    assert (TABLE, "transfer") in copies
    assert "0190a000-0000-7000-8000-00000000dead" not in local_keys(device, TABLE)
    assert_in_sync(snap_server, device, H1, "Login")


def test_rows_a_subscription_holds_stay_held_by_both(snap_server, make_client, store, copies):
    _build(snap_server)
    device = make_client()
    patient = _a_patient_of_hospital_1(store)
    device.sync("PatientDetails", params={"patient_id": patient})
    history = local_keys(device, TABLE)
    assert history

    device.sync("Login")

    assert (TABLE, "transfer") in copies
    assert_in_sync(snap_server, device, H1, "Login")
    device.unsubscribe("PatientDetails", {"patient_id": patient})
    assert history <= local_keys(device, TABLE)  # Login holds them too
    assert device.store.query("SELECT count(*) FROM syncunit_holds") == [(0,)]
    assert_in_sync(snap_server, device, H1, "Login")


def _a_patient_of_hospital_1(store: Any) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(appointment.c.patient_id).where(
                    appointment.c.id == appointments_of(store, 1)[0]
                )
            ).scalar_one()
        )


def test_a_watched_query_sees_the_copy_and_keeps_its_triggers(
    snap_server, make_client, copies, fresh_install
):
    _build(snap_server)
    device = make_client()
    device.catalog()
    counts: list[int] = []
    seen = threading.Event()

    def on_rows(rows: list[tuple[Any, ...]]) -> None:
        counts.append(rows[0][0])
        if rows[0][0] > 0:
            seen.set()

    device.watch_query(f'SELECT count(*) FROM "{TABLE}"', (), on_rows)
    deadline = 50
    while not any(r[0] == "temp" for r in schema_of(device)) and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    before = schema_of(device)
    assert [r for r in before if r[0] == "temp"]

    device.sync("Login")

    assert (TABLE, fresh_install) in copies
    assert seen.wait(10), counts
    assert counts[-1] == len(appointments_of(snap_server.store, 1))
    assert schema_of(device) == before  # the watcher's triggers are back, and temporary


def test_a_table_with_a_trigger_of_the_app_gets_the_rows_through_it(
    snap_server, make_client, copies
):
    _build(snap_server)
    device = make_client()
    device.catalog()
    device.store.conn.execute("CREATE TABLE app_log (id TEXT)")
    device.store.conn.execute(
        f'CREATE TRIGGER app_seen AFTER INSERT ON "{TABLE}" BEGIN'
        " INSERT INTO app_log VALUES (NEW.id); END"
    )
    before = schema_of(device)

    result = device.sync("Login")

    assert "appointments" in result.snapshots
    assert (TABLE, "upsert") in copies  # SQLite cannot transfer past a trigger: rows one by one
    assert {r[0] for r in device.store.query("SELECT id FROM app_log")} == local_keys(device, TABLE)
    assert schema_of(device) == before
    assert device.store.query("PRAGMA integrity_check") == [("ok",)]
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_file_that_holds_other_rows_than_offered_is_not_used(snap_server, make_client):
    built = _build(snap_server)
    for snap in built:  # a server bug: the offer says one row more than the file has
        meta = snap.path.with_name(f"{snap.name}.json")
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "rows": snap.rows + 1}))
    snap_server.snapshots._known.clear()
    device = make_client()

    result = device.sync("Login")

    assert result.snapshots == []
    assert_in_sync(snap_server, device, H1, "Login")


class _Network(httpx.BaseTransport):
    """Real HTTP, with the snapshot downloads changed: ``Range`` ignored, or the body cut."""

    def __init__(self, *, ignore_range: bool = False, cut_after: int | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.ignore_range = ignore_range
        self.cut_after = cut_after
        self.log: list[tuple[str, int]] = []
        self.requests = 0  # of any kind

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        snapshot = request.url.path.startswith("/v1/snapshots/")
        if snapshot and self.ignore_range:
            request.headers.pop("Range", None)
        response = self.inner.handle_request(request)
        if not snapshot:
            return response
        self.log.append((request.url.path, response.status_code))
        if self.cut_after is None:
            return response
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Cut(response.stream, self.cut_after),
        )

    def close(self) -> None:
        self.inner.close()


class _Cut(httpx.SyncByteStream):
    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.after = inner, after

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for block in self.inner:
            if sent + len(block) > self.after:
                yield block[: self.after - sent]
                raise httpx.ReadError("connection reset (test)")
            sent += len(block)
            yield block

    def close(self) -> None:
        self.inner.close()


def _offer(snap: Any) -> SnapshotOffer:
    path = f"/v1/snapshots/{snap.stream}/{snap.name}"
    return SnapshotOffer(snap.stream, path, snap.size, snap.sha256, snap.rows, snap.cursor)


def _parts(device: Any) -> list[Path]:
    folder = Path(device.store.conn.execute("PRAGMA database_list").fetchone()[2]).parent
    return list(folder.glob(".syncunit-snapshot-*"))


def test_a_server_that_ignores_range_sends_the_whole_file_again(snap_server, make_client):
    snap = next(s for s in _build(snap_server) if s.stream == "appointments")
    network = _Network(ignore_range=True)
    device = make_client(transport=network)
    part = bootstrap.part_path(device.store, _offer(snap))
    part.write_bytes(snap.path.read_bytes()[: snap.size // 2])  # an earlier attempt's

    result = device.sync("Login")

    assert "appointments" in result.snapshots
    assert (_offer(snap).path, 200) in network.log
    assert result.requests == network.requests
    assert _parts(device) == []
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_cut_download_is_copied_row_by_row_in_the_same_run_leaving_nothing(
    snap_server, make_client
):
    snap = next(s for s in _build(snap_server) if s.stream == "appointments")
    network = _Network(cut_after=snap.size // 3)
    device = make_client(transport=network)

    result = device.sync("Login")

    assert "appointments" not in result.snapshots
    assert result.requests == network.requests  # the cut download counts
    assert _parts(device) == []  # the copy row by row made the half download useless
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_download_the_disk_cannot_hold_is_copied_row_by_row_in_the_same_run(
    snap_server, make_client, monkeypatch
):
    snap = next(s for s in _build(snap_server) if s.stream == "appointments")
    device = make_client()
    real = bootstrap._download

    def disk_fills(http: Any, offer: Any, part: Path, have: int, *rest: Any) -> Any:
        if offer.stream != "appointments":
            return real(http, offer, part, have, *rest)
        with part.open("ab") as f:
            f.write(snap.path.read_bytes()[: snap.size // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bootstrap, "_download", disk_fills)

    result = device.sync("Login")

    assert result.snapshots == ["doctors"]
    assert _parts(device) == []
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_download_a_failed_run_left_goes_once_its_stream_is_copied_row_by_row(
    snap_server, server, make_client, live
):
    """The disk fills up during a first sync: the download (cut here) is kept for the
    next attempt, and the copy row by row fails too. A later sync copies the stream
    row by row (no file is offered now): the download can never be used again."""
    snap = next(s for s in _build(snap_server) if s.stream == "appointments")
    device = make_client(transport=_Network(cut_after=snap.size // 3))
    device.catalog()
    conn = device.store.conn
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # a little room, not for the rows

    with pytest.raises(LocalStoreError, match="database or disk is full"):
        device.sync("Login")
    assert [p.suffix for p in _parts(device)] == [".part"]  # to resume next time

    conn.execute(f"PRAGMA max_page_count = {2**30}")  # room again
    live.app = server.app  # a server that offers no file
    device.sync("Login")

    assert _parts(device) == []
    assert_in_sync(snap_server, device, H1, "Login")
    device.sync("Login")  # nothing left to remove: nothing to record either
    assert (
        device.store.query("SELECT key FROM syncunit_local WHERE key LIKE 'snapshot_download:%'")
        == []
    )


def test_after_a_large_sync_the_wal_is_checkpointed_in_the_background(
    snap_server, make_client, monkeypatch
):
    """sync() returns before the WAL is copied into the database file; a passive
    checkpoint on another connection does it, then commits checkpoint again."""
    from syncunit.client import store as store_module

    monkeypatch.setattr(store_module, "BIG_WAL", 0)  # the test data makes a small WAL
    _build(snap_server)
    device = make_client()
    started = threading.Event()
    inner = store_module.LocalStore._checkpoint

    def checkpoint(self: Any) -> None:
        started.set()
        inner(self)

    monkeypatch.setattr(store_module.LocalStore, "_checkpoint", checkpoint)

    device.sync("Login")

    assert started.wait(10)
    for _ in range(200):
        if device.store.query("PRAGMA wal_autocheckpoint") == [(1000,)]:
            break
        threading.Event().wait(0.05)
    assert device.store.query("PRAGMA wal_autocheckpoint") == [(1000,)]
    assert device.store.query("PRAGMA wal_checkpoint(PASSIVE)")[0][0] == 0  # not busy
    assert_in_sync(snap_server, device, H1, "Login")
