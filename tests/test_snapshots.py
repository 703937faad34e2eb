"""Snapshot bootstrap: a first copy as one prebuilt file, then deltas from its cursor.

The hospital server keeps snapshot files in a folder; the tests build them
explicitly (the server builds them in the background on a large first copy).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import sqlalchemy as sa
from hospital.models import appointment, doctor
from hospital.units import (
    appointment_columns,
    appointment_joins,
    doctors,
    my_hospital,
    patient_param,
    the_patient,
)
from hospital.units import schema as hospital_schema

from syncunit import Stream, SyncSchema, SyncUnit
from syncunit.client import bootstrap
from syncunit.errors import AuthError
from syncunit.heldfiles import held_scratch
from syncunit.protocol import SnapshotOffer
from syncunit.server import Principal, SyncServer, TokenAuth, snapshots
from syncunit.server.cursor import decode_cursor
from syncunit.server.snapshots import Snapshot, Snapshots
from tests.support import appointments_of, assert_in_sync, principal_params

H1 = "token-h1"


@pytest.fixture
def snap_server(make_server, live, tmp_path):
    server = make_server(snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1)
    live.app = server.app
    return server


def _build(server, token=H1):
    params = principal_params(server.store, token)
    return [server.snapshots.build(s, params) for s in hospital_schema.units["Login"].streams]


def test_first_sync_applies_the_snapshot_then_a_delta_in_the_same_run(
    snap_server, make_client, tap
):
    built = _build(snap_server)
    device = make_client(transport=tap)

    result = device.sync("Login")

    largest_first = sorted(built, key=lambda s: s.size, reverse=True)
    paths = [f"/v1/snapshots/{s.stream}/{s.name}" for s in largest_first]
    assert tap.log == [
        ("POST", "/v1/sync/Login", 200),
        *[("GET", p, 200) for p in paths],
        ("POST", "/v1/sync/Login", 200),  # the delta from the snapshot's cursor
    ]
    assert sorted(result.snapshots) == ["appointments", "doctors"]
    assert result.requests == len(tap.log) == 4  # the downloads count too
    assert any(isinstance(f, SnapshotOffer) for f in tap.responses[0])
    assert_in_sync(snap_server, device, H1, "Login")


def test_changes_after_the_snapshot_arrive_by_delta(snap_server, make_client, store):
    _build(snap_server)
    mine = appointments_of(store, 1)
    with store.write() as conn:  # after the snapshot's watermark, before the device's sync
        conn.execute(appointment.delete().where(appointment.c.id == mine[0]))
        conn.execute(appointment.update().where(appointment.c.id == mine[1]).values(notes="n"))
        conn.execute(doctor.update().where(doctor.c.hospital_id == 1).values(name="Dr Renamed"))
    device = make_client()

    device.sync("Login")
    assert_in_sync(snap_server, device, H1, "Login")

    with store.write() as conn:
        conn.execute(appointment.update().where(appointment.c.id == mine[2]).values(notes="m"))
    result = device.sync("Login")

    assert result.snapshots == []
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_snapshot_is_offered_and_served_only_for_the_same_scope(
    snap_server, make_client, live, tap
):
    [_, h1_appointments] = _build(snap_server)
    other = make_client("token-h2", name="other", transport=tap)

    other.sync("Login")

    # Every doctor is in every scope (one shared file); h1's appointments are not h2's.
    offered = [f.stream for f in tap.responses[0] if isinstance(f, SnapshotOffer)]
    assert offered == ["doctors"]
    assert_in_sync(snap_server, other, "token-h2", "Login")
    r = httpx.get(
        f"{live.url}/v1/snapshots/appointments/{h1_appointments.name}",
        headers={"Authorization": "Bearer token-h2"},
    )
    assert r.status_code == 404
    assert r.json()["code"] == "unknown-snapshot"


def test_a_corrupt_download_is_discarded_and_the_stream_copied_row_by_row(
    snap_server, make_client, tap
):
    built = _build(snap_server)
    for snap in built:
        data = bytearray(snap.path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        snap.path.write_bytes(bytes(data))
    device = make_client(transport=tap)

    result = device.sync("Login")

    assert result.snapshots == []
    assert tap.log[-1] == ("POST", "/v1/sync/Login", 200)
    assert not any(isinstance(f, SnapshotOffer) for f in tap.responses[-1])
    assert not list(
        Path(device.store.conn.execute("PRAGMA database_list").fetchone()[2]).parent.glob(
            ".syncunit-snapshot-*"
        )
    )
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_file_damaged_after_publishing_is_not_offered_but_built_again(
    snap_server, make_client, tap, caplog
):
    """A file truncated on the server (a full disk, an operator) is no longer offered:
    each new device would download it only to refuse it. It is removed, and the
    large first copy that found it so has it built again."""
    built = _build(snap_server)
    damaged = next(s for s in built if s.stream == "appointments")
    with damaged.path.open("r+b") as f:
        f.truncate(damaged.size // 3)
    device = make_client(transport=tap)

    result = device.sync("Login")

    assert result.snapshots == ["doctors"]
    assert not any(damaged.name in path for _, path, _ in tap.log)  # never downloaded
    assert f"removing snapshot {damaged.name}: its file holds" in caplog.text
    assert_in_sync(snap_server, device, H1, "Login")
    snaps = snap_server.snapshots
    deadline = time.monotonic() + 30  # built again in the background, whole
    while time.monotonic() < deadline and len(snaps.ready()) < 2:
        time.sleep(0.05)
    again = next(s for s in snaps.ready() if s.stream == "appointments")
    assert again.path.stat().st_size == again.size
    assert sorted(make_client(name="second").sync("Login").snapshots) == [
        "appointments",
        "doctors",
    ]


def test_a_build_that_failed_waits_before_it_is_tried_again(snap_server, monkeypatch):
    snaps = snap_server.snapshots
    stream = hospital_schema.units["Login"].streams[0]
    params = principal_params(snap_server.store, H1)
    now = [1000.0]
    snaps.clock = lambda: now[0]
    builds: list[float] = []

    def failing(*args: Any) -> Snapshot:
        builds.append(now[0])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snaps, "build", failing)

    def build_later() -> None:
        snaps.build_later(stream, params)
        deadline = time.monotonic() + 10
        while snaps._building and time.monotonic() < deadline:
            time.sleep(0.01)

    build_later()
    build_later()  # a first copy at once after: no build
    now[0] += snapshots.BUILD_RETRY_DELAY
    build_later()  # the delay is over: built again, failed again
    now[0] += snapshots.BUILD_RETRY_DELAY
    build_later()  # the delay doubled
    now[0] += snapshots.BUILD_RETRY_DELAY
    build_later()

    assert builds == [1000.0, 1060.0, 1180.0]
    monkeypatch.undo()
    now[0] += 4 * snapshots.BUILD_RETRY_DELAY
    build_later()  # succeeds: the next failure waits the first delay again
    assert len(snaps.ready()) == 1


def test_a_cut_download_resumes_with_a_range_request(snap_server, make_client, tap, tmp_path):
    built = _build(snap_server)
    device = make_client(transport=tap)
    appointments = next(s for s in built if s.stream == "appointments")
    offer = SnapshotOffer(
        stream="appointments",
        path=f"/v1/snapshots/appointments/{appointments.name}",
        size=appointments.size,
        sha256=appointments.sha256,
        rows=appointments.rows,
        cursor=appointments.cursor,
    )
    part = bootstrap.part_path(device.store, offer)
    part.write_bytes(appointments.path.read_bytes()[: appointments.size // 2])  # an earlier cut

    result = device.sync("Login")

    assert ("GET", offer.path, 206) in tap.log
    assert result.requests == len(tap.log)  # the resumed download counts
    assert not part.exists()
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_download_no_offer_continues_is_swept(snap_server, make_client, tap):
    built = _build(snap_server)
    device = make_client(transport=tap)
    appointments = next(s for s in built if s.stream == "appointments")
    current = _offer(appointments)
    rebuilt = msgspec.structs.replace(current, sha256="0" * 64)  # a file built over since
    dead, part = (
        bootstrap.part_path(device.store, rebuilt),
        bootstrap.part_path(device.store, current),
    )
    dead.write_bytes(b"half of a file no offer names again")
    part.write_bytes(appointments.path.read_bytes()[: appointments.size // 2])
    another = dead.with_name(f"{bootstrap.SCRATCH}other.sqlite-{'0' * 24}.part")
    another.write_bytes(b"another database's download")  # that database may resume it
    # ... and one of a database whose name starts with this one's ("x.sqlite-2")
    longer = dead.with_name(dead.name.replace(f"-{'0' * 24}.part", f"-2-{'0' * 24}.part"))
    longer.write_bytes(b"another database's download")

    result = device.sync("Login")

    assert "appointments" in result.snapshots
    assert ("GET", current.path, 206) in tap.log  # the current one was resumed
    assert not dead.exists()
    assert not part.exists()
    assert another.exists()
    assert longer.exists()
    assert_in_sync(snap_server, device, H1, "Login")


def _offer(snap: Snapshot) -> SnapshotOffer:
    return SnapshotOffer(
        stream=snap.stream,
        path=f"/v1/snapshots/{snap.stream}/{snap.name}",
        size=snap.size,
        sha256=snap.sha256,
        rows=snap.rows,
        cursor=snap.cursor,
    )


def test_a_large_first_copy_builds_a_snapshot_in_the_background(snap_server, make_client):
    first = make_client(name="first")
    first.sync("Login")  # no file yet: row by row, and one is built meanwhile
    snaps = snap_server.snapshots
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(snaps.ready()) < 2:
        time.sleep(0.05)
    second = make_client(name="second")

    result = second.sync("Login")

    assert sorted(result.snapshots) == ["appointments", "doctors"]
    assert_in_sync(snap_server, second, H1, "Login")
    with snap_server.store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(appointment)).scalar() > 0


def test_a_snapshot_leaves_rows_with_local_changes_alone(snap_server, make_client, store):
    _build(snap_server)
    device = make_client()
    device.catalog()
    mine = appointments_of(store, 1)[0]
    booking = {
        "doctor_id": 1,
        "patient_id": 7,
        "starts_at": "2031-05-01T09:00:00",
        "ends_at": "2031-05-01T09:30:00",
        "status": "booked",
        "room": "R2",
        "notes": "mine",
    }
    # A local row the server does not know, and one the device changed before its first pull.
    new_key = device.insert("LocalAppointment", booking)
    device.insert("LocalAppointment", {**booking, "id": mine, "notes": "changed here"})

    result = device.sync("Login")

    assert "appointments" in result.snapshots
    local = dict(device.store.query('SELECT id, notes FROM "LocalAppointment"'))
    assert local[new_key] == "mine"
    assert local[mine] == "changed here"  # pulls never clobber a pending change
    assert len(local) == len(appointments_of(store, 1)) + 1


def test_a_snapshot_build_reads_the_file_mapped_on_sqlite(backend, snap_server, monkeypatch):
    if backend != "sqlite":
        pytest.skip("the memory map is SQLite's")
    from syncunit.server import changes
    from syncunit.server.sqlite import MMAP_BYTES

    sizes: list[int] = []
    partitions = changes.StreamReader._partitions

    def spy(self: changes.StreamReader, conn: Any, *args: Any, **kw: Any) -> Any:
        sizes.append(conn.exec_driver_sql("PRAGMA mmap_size").scalar())
        return partitions(self, conn, *args, **kw)

    monkeypatch.setattr(changes.StreamReader, "_partitions", spy)
    assert all(snap.rows for snap in _build(snap_server))
    assert sizes == [MMAP_BYTES] * len(sizes) != []


# -- who may download a file ------------------------------------------------------------

REFUSED: set[str] = set()  # principals the guarded stream's hook refuses now
guarded = Stream(
    "appointments",
    appointment,
    appointment_columns,
    joins=appointment_joins,
    where=doctor.c.hospital_id == my_hospital,
    local_table="LocalAppointment",
    authorize=lambda principal, params: principal.id not in REFUSED,
)
guarded_schema = SyncSchema([SyncUnit("Login", [doctors, guarded])])


@pytest.fixture
def refused() -> Iterator[set[str]]:
    REFUSED.clear()
    yield REFUSED
    REFUSED.clear()


def test_a_download_is_authorized_like_a_sync_of_its_stream(
    make_server, live, make_client, refused, tmp_path
):
    server = make_server(guarded_schema, snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1)
    live.app = server.app
    snap = server.snapshots.build(guarded, principal_params(server.store, H1))
    url = f"{live.url}/v1/snapshots/appointments/{snap.name}"
    auth = {"Authorization": f"Bearer {H1}"}
    assert httpx.get(url, headers=auth).content == snap.path.read_bytes()

    refused.add("staff:1")  # its access revoked after the offer, or never given
    with pytest.raises(AuthError) as sync_refusal:
        make_client().sync("Login")

    for method in ("GET", "HEAD"):
        r = httpx.request(method, url, headers=auth)
        assert r.status_code == sync_refusal.value.status == 403
    r = httpx.get(url, headers={**auth, "Range": "bytes=10-"})  # nor resumed
    assert (r.status_code, r.json()["code"]) == (403, sync_refusal.value.code) == (403, "forbidden")
    assert "may not read stream 'appointments'" in r.json()["detail"]


def test_a_stream_read_with_client_parameters_has_no_file_to_download(make_server, live, tmp_path):
    """Such a stream is never offered as a file: a download of it finds none (404), and
    its ``authorize`` hook, written for the client parameters a sync always passes, is
    not called without them (it raised, and the client got a 500)."""
    chosen = Stream(
        "patient_history",
        appointment,
        appointment_columns,
        joins=appointment_joins,
        where=sa.and_(doctor.c.hospital_id == my_hospital, appointment.c.patient_id == the_patient),
        local_table="LocalAppointment",
        client_params=patient_param,
        authorize=lambda principal, params: params["patient_id"] > 0,
    )
    server = make_server(
        SyncSchema([SyncUnit("Login", [doctors]), SyncUnit("PatientDetails", [chosen])]),
        snapshot_dir=tmp_path / "snapshots",
    )
    live.app = server.app
    r = httpx.get(
        f"{live.url}/v1/snapshots/patient_history/patient_history-0123456789ab-1",
        headers={"Authorization": f"Bearer {H1}"},
    )
    assert (r.status_code, r.json()["code"]) == (404, "unknown-snapshot")


def test_a_download_needs_a_unit_the_principal_may_run(server, live, tmp_path):
    desk = Principal("desk", {"hospital_id": 1}, units=frozenset({"Splash"}))
    server = SyncServer(
        hospital_schema,
        server.store,
        authenticate=TokenAuth({"t": desk}),
        snapshot_dir=tmp_path / "snapshots",
    )
    live.app = server.app
    snap = server.snapshots.build(hospital_schema.streams["appointments"], {"hospital_id": 1})

    r = httpx.get(
        f"{live.url}/v1/snapshots/appointments/{snap.name}", headers={"Authorization": "Bearer t"}
    )

    assert (r.status_code, r.json()["code"]) == (403, "unit-forbidden")


def _range_refusals(server: SyncServer, code: str) -> float:
    sample = server.metrics.registry.get_sample_value(
        "syncunit_refused_requests_total", {"code": code}
    )
    return sample or 0.0


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        ("bytes=5-2", 400, "invalid-range"),  # its last byte before its first
        ("bytes=abc", 400, "invalid-range"),  # no range in it
        ("pages=0-10", 400, "invalid-range"),  # another unit
        ("bytes", 400, "invalid-range"),
        ("bytes=99999999-", 416, "range-not-satisfiable"),  # past the end
        ("bytes=0-1, 99999999-", 416, "range-not-satisfiable"),
    ],
)
def test_a_bad_range_is_a_problem_logged_and_counted(
    snap_server, live, caplog, header, status, code
):
    caplog.set_level(logging.INFO, logger="syncunit")
    snap = _build(snap_server)[0]
    url = f"{live.url}/v1/snapshots/{snap.stream}/{snap.name}"
    before = _range_refusals(snap_server, code)

    r = httpx.get(url, headers={"Authorization": f"Bearer {H1}", "Range": header})

    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code
    assert r.json()["detail"]
    if status == 416:
        assert r.headers["content-range"] == f"bytes */{snap.size}"
    assert _range_refusals(snap_server, code) == before + 1
    refused = [rec.getMessage() for rec in caplog.records if rec.name == "syncunit.server"]
    assert any("refused GET /v1/snapshots/" in m and code in m for m in refused), refused
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


def test_good_ranges_and_a_stale_if_range_still_serve_the_file(snap_server, live):
    snap = _build(snap_server)[0]
    url = f"{live.url}/v1/snapshots/{snap.stream}/{snap.name}"
    auth = {"Authorization": f"Bearer {H1}"}
    whole = snap.path.read_bytes()

    r = httpx.get(url, headers={**auth, "Range": "bytes=10-"})
    assert (r.status_code, r.content) == (206, whole[10:])
    r = httpx.get(url, headers={**auth, "Range": "bytes=-5"})
    assert (r.status_code, r.content) == (206, whole[-5:])
    # A Range of another version of the file (If-Range) is ignored: the whole file.
    r = httpx.get(url, headers={**auth, "Range": "bytes=99999999-", "If-Range": '"old"'})
    assert (r.status_code, r.content) == (200, whole)


# -- the folder: restarts, killed builds, several server processes ------------------------


def test_a_restarted_process_takes_the_folder_into_account(server, tmp_path):
    folder = tmp_path / "snapshots"
    streams = hospital_schema.units["Login"].streams
    first = Snapshots(server.store, folder, min_rows=1, keep=2)
    built = [first.build(s, {"hospital_id": h}) for h in (1, 2) for s in streams]
    killed = folder / "appointments-0-0-killed.building"  # its process died mid-build
    killed.write_bytes(b"pages")
    fd, building = held_scratch(folder, "doctors-", snapshots.BUILDING)  # a live build, elsewhere
    stray = folder / "doctors-0-0-1-ab.sqlite.zst"  # no side file: cannot be offered
    stray.write_bytes(b"?")

    try:
        after = Snapshots(server.store, folder, min_rows=1, keep=2)  # the next process
        assert building.exists()
    finally:
        os.close(fd)

    assert sorted(x.name for x in after.ready()) == sorted(x.name for x in built[2:])
    assert not killed.exists()
    assert not stray.exists()
    assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == sorted(
        [building.name, *(f"{x.name}{ext}" for x in built[2:] for ext in (".json", ".sqlite.zst"))]
    )
    after.build(streams[0], {"hospital_id": 1})  # bounded over what both processes built
    assert len(after.ready()) == 2
    assert len(list(folder.glob("*.sqlite.zst"))) == 2


def test_any_process_on_the_folder_offers_and_serves_a_file(
    snap_server, make_server, make_client, live, tap, tmp_path
):
    built = _build(snap_server)  # by one process
    other = make_server(snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1)
    live.app = other.app  # every request to another process on the same folder
    device = make_client(transport=tap)

    result = device.sync("Login")

    assert sorted(result.snapshots) == ["appointments", "doctors"]
    assert [x for x in tap.log if x[0] == "GET"] == [
        ("GET", f"/v1/snapshots/{s.stream}/{s.name}", 200)
        for s in sorted(built, key=lambda s: s.size, reverse=True)
    ]
    assert sorted(x.name for x in other.snapshots.ready()) == sorted(x.name for x in built)
    assert_in_sync(snap_server, device, H1, "Login")


def test_a_build_reads_within_the_tenant_scope(store, server, monkeypatch, tmp_path):
    """A store sharded by tenant (Citus) reads only within a tenant's scope."""
    opened = store.snapshot
    scopes: list[Any] = []

    def scoped(**kw: Any) -> Any:
        scopes.append(kw.get("scope"))
        if kw.get("scope") is None:
            raise ValueError("on Citus every pull is scoped to a tenant")
        return opened(**kw)

    monkeypatch.setattr(store, "snapshot", scoped)
    snaps = Snapshots(store, tmp_path / "snapshots", min_rows=1)

    snap = snaps.build(hospital_schema.streams["appointments"], {"hospital_id": 1})

    assert scopes == [{"hospital_id": 1}]
    assert snap.rows == len(appointments_of(store, 1))


def test_a_build_on_a_citus_store_reads_on_the_tenants_node(backend, server, tmp_path):
    """Citus is not installed here: its store on plain PostgreSQL, with the function it
    installs on the tenant's node created as on one node."""
    if backend != "postgres":
        pytest.skip("the Citus store is PostgreSQL's")
    from syncunit.server.citus import _NODE_FUNCTION, CitusStore

    citus = CitusStore(server.store.engine, tenant="hospital_id", colocate_with="doctor")
    with citus.engine.begin() as conn:
        conn.exec_driver_sql(_NODE_FUNCTION.format(type="bigint"))
    snaps = Snapshots(citus, tmp_path / "snapshots", min_rows=1)

    snap = snaps.build(hospital_schema.streams["appointments"], {"hospital_id": 1})

    cursor = decode_cursor(snap.cursor)
    assert cursor is not None
    assert "@" in cursor.epoch
    assert snap.rows == len(appointments_of(server.store, 1))
