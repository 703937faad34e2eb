"""The local store on a connection the app opened: plain sqlite3, or SQLCipher (encrypted).

A device that must encrypt its data at rest opens the file with ``sqlcipher3``,
sets the key, and hands the connection to ``SyncClient``; everything the engine
does (chunks, cursors, the outbox triggers, pushes) runs on it, and its errors
come out as ``LocalStoreError``, never as the driver's own exceptions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hospital.models import appointment
from hospital.units import schema as hospital_schema

from syncunit.client import SyncClient
from syncunit.errors import LocalStoreError
from syncunit.protocol import SnapshotOffer
from syncunit.server import SyncServer
from tests.support import LiveServer, TapTransport, assert_in_sync, principal_params

KEY = "correct horse battery staple"


def booking(minute: int) -> dict[str, Any]:
    return {
        "doctor_id": 1,
        "patient_id": 5,
        "starts_at": f"2031-02-03T09:{minute:02d}:00",
        "ends_at": f"2031-02-03T09:{minute + 1:02d}:00",
        "status": "booked",
        "room": "Encrypted-7",
        "notes": "",
    }


def _round_trip(
    client: SyncClient, server: SyncServer, in_sync: Callable[[SyncClient, str], None]
) -> None:
    """Pull a unit, write locally, push: the whole engine on the given connection."""
    client.sync("Login")
    in_sync(client, "Login")
    key = client.insert("LocalAppointment", booking(7))
    result = client.sync("SendAppointments")
    assert result.applied == 1, result
    with server.store.engine.connect() as conn:
        rooms = conn.execute(sa.select(appointment.c.room).where(appointment.c.id == key))
        assert rooms.scalar() == "Encrypted-7"
    client.sync("Login")  # the pushed row comes back with its server version


def test_a_plain_sqlite3_connection_is_used_as_given(
    live: LiveServer,
    server: SyncServer,
    tmp_path: Path,
    in_sync: Callable[[SyncClient, str], None],
) -> None:
    conn = sqlite3.connect(tmp_path / "app.sqlite", check_same_thread=False)
    conn.execute("PRAGMA journal_mode=DELETE")  # the app's choice, kept
    client = SyncClient(live.url, conn, token="token-h1", chunk_size=16)
    try:
        assert client.store.conn is conn
        _round_trip(client, server, in_sync)
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "delete"
        # The app keeps using its own connection: the synced rows are there.
        n = conn.execute("SELECT count(*) FROM LocalAppointment").fetchone()[0]
        assert n > 0
    finally:
        client.close()


def test_a_value_that_is_no_connection_is_refused_clearly(live: LiveServer) -> None:
    with pytest.raises(TypeError, match="sqlite3-compatible connection"):
        SyncClient(live.url, 42, token="token-h1")


def _sqlcipher() -> Any:
    try:
        import sqlcipher3
    except ImportError:
        pytest.skip(
            "sqlcipher3 is not installed (pip install sqlcipher3-binary, or sqlcipher3 with"
            " libsqlcipher): the encrypted store is tested where it installs"
        )
    return sqlcipher3


def _open_encrypted(path: Path, key: str, *, before_4_12: bool = False) -> Any:
    options = {"factory": _before_4_12()} if before_4_12 else {}
    conn = _sqlcipher().connect(str(path), check_same_thread=False, **options)
    conn.execute(f"PRAGMA key = '{key}'")
    return conn


def _before_4_12() -> Any:
    """A SQLCipher connection as one before 4.12 answers: no ``cipher_status``."""

    class Before412(_sqlcipher().Connection):  # type: ignore[misc, name-defined]
        def execute(self, sql: str, *args: Any) -> Any:
            if sql.strip().lower() == "pragma cipher_status":
                sql = "SELECT 1 WHERE 0"
            return super().execute(sql, *args)

    return Before412


def test_a_sqlcipher_connection_syncs_into_an_encrypted_file(
    live: LiveServer,
    server: SyncServer,
    tmp_path: Path,
    in_sync: Callable[[SyncClient, str], None],
) -> None:
    path = tmp_path / "secret.sqlite"
    client = SyncClient(live.url, _open_encrypted(path, KEY), token="token-h1", chunk_size=16)
    try:
        _round_trip(client, server, in_sync)
        names = [r[0] for r in client.store.query("SELECT doctor_name FROM LocalAppointment")]
        assert names
    finally:
        client.close()

    # At rest, nothing readable: not the synced names, not the pushed row, not the schema.
    raw = path.read_bytes()
    assert b"SQLite format 3" not in raw
    assert names[0].encode() not in raw
    assert b"Encrypted-7" not in raw
    plain = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        plain.execute("SELECT count(*) FROM sqlite_master").fetchone()
    plain.close()

    # With the key, the device opens again where it was: nothing pending, cursors kept.
    again = SyncClient(live.url, _open_encrypted(path, KEY), token="token-h1", chunk_size=16)
    try:
        assert again.outbox.count() == 0
        assert again.sync("Login").total_in == 0
        in_sync(again, "Login")
    finally:
        again.close()


def test_driver_errors_of_a_sqlcipher_connection_become_local_store_errors(
    tmp_path: Path,
) -> None:
    path = tmp_path / "secret.sqlite"
    from syncunit.client.store import LocalStore

    store = LocalStore(_open_encrypted(path, KEY))
    with pytest.raises(LocalStoreError, match="no such table"):
        store.query("SELECT * FROM missing_table")
    store.close()

    with pytest.raises(LocalStoreError, match="PRAGMA key"):
        LocalStore(_open_encrypted(path, "the wrong key"))


# -- snapshots: plain SQLite files, so never beside an encrypted store -----------------------


@pytest.fixture
def snap_live(
    make_server: Callable[..., SyncServer], live: LiveServer, tmp_path: Path
) -> SyncServer:
    """The hospital server with a snapshot of each Login stream built for token-h1."""
    server = make_server(snapshot_dir=tmp_path / "snapshots", snapshot_min_rows=1)
    live.app = server.app
    assert server.snapshots is not None
    params = principal_params(server.store, "token-h1")
    for stream in hospital_schema.units["Login"].streams:
        server.snapshots.build(stream, params)
    return server


def _beside(path: Path) -> list[str]:
    """The files in the device's folder other than its database (and its WAL, SHM)."""
    return sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(path.name))


@pytest.mark.parametrize("before_4_12", [False, True], ids=["sqlcipher", "sqlcipher-before-4.12"])
@pytest.mark.parametrize("offered_anyway", [False, True])
def test_an_encrypted_store_takes_no_snapshot_and_copies_row_by_row(
    snap_live: SyncServer,
    live: LiveServer,
    tmp_path: Path,
    offered_anyway: bool,
    before_4_12: bool,
) -> None:
    """A snapshot is a plain SQLite file: downloaded beside an encrypted store it would
    hold the scope's rows in the clear. The client does not ask for one; a server that
    offers one anyway (``offered_anyway``: the client asks as if it could) gets the
    request again without them, and nothing is downloaded."""
    device = tmp_path / "device" / "secret.sqlite"
    device.parent.mkdir()
    tap = TapTransport()
    conn = _open_encrypted(device, KEY, before_4_12=before_4_12)
    client = SyncClient(live.url, conn, token="token-h1", transport=tap)
    try:
        assert client.store.encrypted
        assert not client.snapshots
        client.snapshots = offered_anyway
        result = client.sync("Login")
        offers = [f for frames in tap.responses for f in frames if isinstance(f, SnapshotOffer)]
        assert len(offers) == (2 if offered_anyway else 0)
        assert [m for m, _, _ in tap.log] == ["POST"] * (2 if offered_anyway else 1)
        assert result.snapshots == []
        assert_in_sync(snap_live, client, "token-h1", "Login")
        assert _beside(device) == []  # no download, no decompressed file
    finally:
        client.close()


def test_only_a_keyed_sqlcipher_connection_counts_as_encrypted(tmp_path: Path) -> None:
    from syncunit.client.store import LocalStore

    keyed = LocalStore(_open_encrypted(tmp_path / "keyed.sqlite", KEY))
    unkeyed = LocalStore(_sqlcipher().connect(str(tmp_path / "plain.sqlite")))
    standard = LocalStore(tmp_path / "standard.sqlite")
    try:
        assert [keyed.encrypted, unkeyed.encrypted, standard.encrypted] == [True, False, False]
    finally:
        for store in (keyed, unkeyed, standard):
            store.close()


def test_before_sqlcipher_4_12_a_plain_file_is_told_by_its_header(tmp_path: Path) -> None:
    """No ``cipher_status``: a SQLCipher connection counts as encrypted unless its file
    starts with SQLite's plain header (one with nothing written yet counts as encrypted)."""
    from syncunit.client.store import LocalStore

    written = LocalStore(tmp_path / "plain.sqlite")  # the standard module: a plain file
    written.close()
    old = _before_4_12()
    keyed = LocalStore(_open_encrypted(tmp_path / "keyed.sqlite", KEY, before_4_12=True))
    plain = LocalStore(_sqlcipher().connect(str(tmp_path / "plain.sqlite"), factory=old))
    # A keyed file that keeps SQLite's header in the clear (iOS shared WAL, as SQLCipher
    # documents): its header says nothing.
    headed = _open_encrypted(tmp_path / "headed.sqlite", KEY, before_4_12=True)
    headed.execute("PRAGMA cipher_plaintext_header_size = 32")
    headed.execute("PRAGMA cipher_salt = \"x'01010101010101010101010101010101'\"")
    headed.execute("CREATE TABLE t (x)")
    assert (tmp_path / "headed.sqlite").read_bytes()[:16] == b"SQLite format 3\x00"
    with_header = LocalStore(headed)
    try:
        assert [keyed.encrypted, plain.encrypted, with_header.encrypted] == [True, False, True]
    finally:
        for store in (keyed, plain, with_header):
            store.close()
