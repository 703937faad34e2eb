"""Resets: when a cursor cannot be trusted, the stream is re-downloaded cleanly.

DESIGN section 6: a changed stream definition, tombstones pruned past the
cursor, another database epoch, or a cursor "from the future" (the database
was replaced by an older copy) reset the stream instead of giving wrong data.
The catalog change also migrates the local table without losing rows.
"""

from __future__ import annotations

import datetime as dt
import threading

import httpx
import pytest
import sqlalchemy as sa
from hospital import units as hospital_units
from hospital.models import appointment, patient

from syncunit import SyncClient
from syncunit.errors import DatabaseRestored, NetworkError, ProblemError
from syncunit.protocol import (
    JSON,
    PROBLEM,
    CatalogFrame,
    End,
    FrameDecoder,
    Mutation,
    SyncRequest,
    encode_request,
)
from syncunit.server.store import tombstones
from syncunit.units import Stream, SyncSchema, SyncUnit
from tests.support import appointments_of, assert_in_sync, doctors_of, local_keys, sent_keys


def _appointments_stream(columns):
    base = hospital_units.appointments
    return Stream(
        "appointments",
        appointment,
        columns,
        joins=base.joins,
        where=base.where,
        local_table="LocalAppointment",
        indexes=base.indexes,
    )


def _schema(appointments):
    return SyncSchema(
        [
            SyncUnit("Splash", [hospital_units.summary]),
            SyncUnit("Login", [hospital_units.doctors, appointments]),
        ]
    )


def schema_with_phone():
    """The hospital schema, plus the patient's phone on LocalAppointment."""
    columns = {**hospital_units.appointments.columns, "patient_phone": patient.c.phone}
    return _schema(_appointments_stream(columns))


def schema_without_room():
    columns = {k: v for k, v in hospital_units.appointments.columns.items() if k != "room"}
    return _schema(_appointments_stream(columns))


def _local_columns(client, table):
    return {r[1]: r[2] for r in client.store.conn.execute(f'PRAGMA table_info("{table}")')}


def _local_indexes(client, table):
    return {r[1] for r in client.store.conn.execute(f'PRAGMA index_list("{table}")')}


# -- a changed stream definition -----------------------------------------------------------


def test_new_column_migrates_the_local_table_and_fills_it(make_server, live, tapped, tap, store):
    tapped.sync("Login")
    old_hash = tapped.store.catalog().schema_hash
    indexes = _local_indexes(tapped, "LocalAppointment")
    assert len(indexes) >= 2
    # The server changes while the client still runs the old schema...
    mine = appointments_of(store, 1)
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.id == mine[0]))
        conn.execute(appointment.update().where(appointment.c.id == mine[1]).values(notes="n"))
    # ...then restarts with a stream that has one more column.
    server2 = make_server(schema_with_phone())
    assert server2.catalog.schema_hash != old_hash
    live.app = server2.app

    result = tapped.sync("Login")

    # One request: the response brings the new catalog before the changes.
    assert tap.log[-2:] == [("POST", "/v1/sync/Login", 200), ("POST", "/v1/sync/Login", 200)]
    assert result.requests == 1
    assert tapped.store.catalog().schema_hash == server2.catalog.schema_hash
    assert _local_columns(tapped, "LocalAppointment")["patient_phone"] == "TEXT"
    assert _local_indexes(tapped, "LocalAppointment") == indexes
    assert result.resets == ["appointments"]  # the doctors stream did not change
    phones = [r[0] for r in tapped.store.rows("LocalAppointment", ["patient_phone"])]
    assert len(phones) == 199
    assert all(p and p.startswith("+351") for p in phones)
    assert_in_sync(server2, tapped, "token-h1", "Login")


def test_catalog_migration_keeps_rows_until_the_pull_refills_them(make_server, live, tapped, store):
    tapped.sync("Login")
    server2 = make_server(schema_with_phone())
    live.app = server2.app

    tapped.catalog(refresh=True)  # the migration alone: ALTER TABLE, no rows lost

    rows = tapped.store.rows("LocalAppointment", ["id", "notes", "patient_phone"])
    assert {r[0] for r in rows} == set(appointments_of(store, 1))
    assert {r[2] for r in rows} == {None}
    tapped.sync("Login")
    assert_in_sync(server2, tapped, "token-h1", "Login")


def test_removed_column_is_dropped_locally_and_rows_stay(make_server, live, tapped, store):
    tapped.sync("Login")
    server2 = make_server(schema_without_room())
    live.app = server2.app

    tapped.sync("Login")

    assert "room" not in _local_columns(tapped, "LocalAppointment")
    assert local_keys(tapped, "LocalAppointment") == set(appointments_of(store, 1))
    assert_in_sync(server2, tapped, "token-h1", "Login")


def test_old_schema_hash_gets_the_new_catalog_as_the_first_frame(make_server, live, client):
    client.sync("Login")
    old_hash = client.store.catalog().schema_hash
    server2 = make_server(schema_with_phone())
    live.app = server2.app
    body = encode_request(SyncRequest(protocol=1, client_id="c", schema_hash=old_hash), "json")

    r = httpx.post(
        f"{live.url}/v1/sync/Login",
        content=body,
        headers={"Authorization": "Bearer token-h1", "Content-Type": JSON},
    )

    assert r.status_code == 200
    frames = list(FrameDecoder("json").feed(r.content))
    assert frames[0] == CatalogFrame(catalog=server2.catalog)
    assert isinstance(frames[-1], End)
    assert not any(isinstance(f, CatalogFrame) for f in frames[1:])


def test_old_schema_hash_with_mutations_gets_a_schema_changed_problem(make_server, live, client):
    client.sync("Login")
    old_hash = client.store.catalog().schema_hash
    live.app = make_server(schema_with_phone()).app
    m = Mutation(seq=1, id="m1", table="LocalAppointment", key="x", op="delete")
    request = SyncRequest(protocol=1, client_id="c", schema_hash=old_hash, mutations=[m])

    r = httpx.post(
        f"{live.url}/v1/sync/Login",
        content=encode_request(request, "json"),
        headers={"Authorization": "Bearer token-h1", "Content-Type": JSON},
    )

    # Mutations made under another schema are not applied: the client migrates first.
    assert r.status_code == 409
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "schema-changed"


def test_pending_mutations_under_an_old_schema_are_pushed_after_the_migration(
    make_server, live, tapped, tap, store
):
    tapped.sync("Login")
    mine = appointments_of(store, 1)
    tapped.update("LocalAppointment", mine[0], {"notes": "after the upgrade"})
    stream = _appointments_stream(
        {**hospital_units.appointments.columns, "patient_phone": patient.c.phone}
    )
    schema = SyncSchema(
        [
            SyncUnit("Login", [hospital_units.doctors, stream]),
            SyncUnit("SendAppointments", [stream], direction="push"),
        ]
    )
    live.app = make_server(schema).app

    result = tapped.sync("SendAppointments")

    assert tap.log[-3:] == [
        ("POST", "/v1/sync/SendAppointments", 409),  # schema-changed: nothing applied
        ("GET", "/v1/catalog", 200),
        ("POST", "/v1/sync/SendAppointments", 200),
    ]
    assert result.applied == 1
    with store.engine.connect() as conn:
        notes = conn.execute(
            sa.select(appointment.c.notes).where(appointment.c.id == mine[0])
        ).scalar_one()
    assert notes == "after the upgrade"


# -- tombstone horizon, epoch, a database from the past ---------------------------------------


def test_client_older_than_the_tombstone_horizon_is_reset(make_client, store, in_sync):
    old = make_client(name="old")
    old.sync("Login")
    mine = appointments_of(store, 1)
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.id.in_(mine[:5])))
        conn.execute(
            appointment.update()
            .where(appointment.c.id == mine[9])
            .values(doctor_id=doctors_of(store, 2)[0])
        )
    recent = make_client(name="recent")
    recent.sync("Login")

    horizon = store.prune_tombstones(0)

    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tombstones)).scalar_one() == 0
    assert horizon > 0
    result = old.sync("Login")
    assert sorted(result.resets) == ["appointments", "doctors"]
    assert local_keys(old, "LocalAppointment") == set(mine[5:9] + mine[10:])
    in_sync(old)
    # A client at or after the horizon keeps its cursor.
    assert recent.sync("Login").resets == []
    in_sync(recent)
    assert old.sync("Login").resets == []


def test_pruning_within_the_retention_window_resets_nobody(client, store, in_sync):
    client.sync("Login")
    gone = appointments_of(store, 1)[3]
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.id == gone))

    store.prune_tombstones(keep_versions=1_000_000)

    result = client.sync("Login")
    assert result.resets == []
    assert result.rows_removed["LocalAppointment"] == 1
    in_sync(client)


def test_changed_epoch_resets_every_stream(client, store, in_sync):
    client.sync("Login")
    client.sync("Splash")
    # The database is replaced by another one, which lacks a row and has no
    # tombstone for it: only a clean re-download removes that row from the client.
    stale = appointments_of(store, 1)[5]
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.id == stale))
        conn.execute(tombstones.delete())
        store._set_fact(conn, "epoch", "another-database")

    login = client.sync("Login")
    splash = client.sync("Splash")

    assert sorted(login.resets) == ["appointments", "doctors"]
    assert splash.resets == ["summary"]
    assert stale not in local_keys(client, "LocalAppointment")
    in_sync(client, "Login")
    in_sync(client, "Splash")
    assert client.sync("Login").resets == []


def test_a_reset_split_across_responses_shows_the_previous_rows_until_it_completes(
    make_server, serve, store, make_client, tap
):
    from hospital.generate import generate

    from syncunit.server.limits import Limits
    from tests.conftest import SIZE
    from tests.support import chunks

    server = make_server(limits=Limits(response_chunks=3))
    generate(store.engine, **SIZE)
    live = serve(server.app)
    device = make_client(url=live.url, transport=tap)
    device.sync("Login")
    before = local_keys(device, "LocalAppointment")
    gone = appointments_of(store, 1)[5]
    with store.write() as conn:  # another database: a row is missing, without a tombstone
        conn.execute(appointment.delete().where(appointment.c.id == gone))
        conn.execute(tombstones.delete())
        store._set_fact(conn, "epoch", "another-database")
    seen: list[set[object]] = []

    def at_each_early_end(frame: object) -> None:
        if isinstance(frame, End) and not frame.complete:
            seen.append(local_keys(device, "LocalAppointment"))

    tap.responses.clear()
    tap.on_frame = at_each_early_end

    result = device.sync("Login")

    assert sorted(result.resets) == ["appointments", "doctors"]
    assert len(seen) > 2  # the re-download took several responses
    assert all(keys == before for keys in seen)  # the old copy, whole, until the swap
    # Each response after the first went on from the last chunk: one reset, at the start.
    assert [c.reset for r in tap.responses for c in chunks(r, "appointments")].count(True) == 1
    assert gone not in local_keys(device, "LocalAppointment")
    assert_in_sync(server, device, "token-h1", "Login")


def test_cursor_from_the_future_resets(make_server, live, client, store, db_backup, in_sync):
    client.sync("Login")
    saved = db_backup.save()
    mine = appointments_of(store, 1)
    _insert_appointments(store, [f"new-{i}" for i in range(3)])
    with store.write() as conn:
        conn.execute(appointment.update().where(appointment.c.id.in_(mine[:30])).values(room="Z"))
    client.sync("Login")
    assert {"new-0", "new-1", "new-2"} <= local_keys(client, "LocalAppointment")

    db_backup.restore(saved, store)  # the database is replaced by the older copy
    if store.dialect == "postgresql":
        # Restored with pg_restore: a new database, whose transaction ids do not go
        # back. The server refuses to start on it until the epoch is renewed.
        with pytest.raises(DatabaseRestored, match="renew-epoch"):
            make_server()
        store.renew_epoch()
    restarted = make_server()
    live.app = restarted.app
    result = client.sync("Login")

    assert sorted(result.resets) == ["appointments", "doctors"]
    assert not {"new-0", "new-1", "new-2"} & local_keys(client, "LocalAppointment")
    assert {r[0] for r in client.store.rows("LocalAppointment", ["room"])} != {"Z"}
    assert_in_sync(restarted, client, "token-h1", "Login")


@pytest.mark.backends("postgres")
def test_a_database_restored_under_a_running_server_is_refused_until_renewed(
    make_server, live, make_client, store, db_backup
):
    """The server keeps running (or another starts with ``install=False``) while its
    database is dropped and restored from a dump: the dump brings back the old epoch
    and cursor key, and transaction ids keep rising, so old cursors look valid. Each
    new connection is checked against the identity tracking recorded: nothing is
    served or applied (a 503 the device retries) until the epoch is renewed."""
    device = make_client(url=live.url)
    device.sync("Login")
    saved = db_backup.save()
    _insert_appointments(store, [f"lost-{i}" for i in range(3)])
    device.sync("Login")
    assert {"lost-0", "lost-1", "lost-2"} <= local_keys(device, "LocalAppointment")

    db_backup.restore(saved, store)  # under the running server
    mine = appointments_of(store, 1)
    device.update("LocalAppointment", mine[0], {"notes": "written after the restore"})

    for server in (live, None):
        if server is None:  # another process starting without install
            live.app = make_server(install=False).app
        for unit in ("SendAppointments", "Login"):  # a push, a pull
            with pytest.raises(ProblemError) as refused:
                device.sync(unit)
            assert (refused.value.status, refused.value.code) == (503, "database-restored")
            assert refused.value.retryable
    assert device.outbox.count() == 1
    with store.engine.connect() as conn:
        notes = conn.execute(
            sa.select(appointment.c.notes).where(appointment.c.id == mine[0])
        ).scalar()
    assert notes != "written after the restore"

    store.renew_epoch()
    assert device.sync("SendAppointments").applied == 1
    result = device.sync("Login")

    assert sorted(result.resets) == ["appointments", "doctors"]
    assert not {"lost-0", "lost-1", "lost-2"} & local_keys(device, "LocalAppointment")
    assert_in_sync(make_server(install=False), device, "token-h1", "Login")


@pytest.mark.backends("postgres")
def test_a_connection_checked_before_is_checked_again(live, make_client, store):
    """Behind PgBouncer the server's connections are to the pooler, which outlives a
    restore and opens new backends to the restored database: an answer remembered per
    connection would serve it. Here the same pooled connections, already checked,
    meet a database whose identity differs from the one tracking recorded."""
    device = make_client(url=live.url)
    device.sync("Login")
    with store.write() as conn:
        store._set_fact(conn, "identity", "another-cluster:1")

    for unit in ("SendAppointments", "Login"):
        if unit == "SendAppointments":
            device.update("LocalAppointment", appointments_of(store, 1)[0], {"notes": "x"})
        with pytest.raises(ProblemError) as refused:
            device.sync(unit)
        assert refused.value.code == "database-restored"


def _insert_appointments(store, keys):
    start = dt.datetime(2026, 2, 1, 9, 0)
    with store.write() as conn:
        conn.execute(
            appointment.insert(),
            [
                {
                    "id": k,
                    "doctor_id": 1,
                    "patient_id": 1,
                    "starts_at": start,
                    "ends_at": start + dt.timedelta(minutes=15),
                    "status": "booked",
                    "room": "R1",
                    "notes": "",
                }
                for k in keys
            ],
        )


def test_pruning_past_an_interrupted_first_download_restarts_it(tapped, tap, store, in_sync):
    tap.arm(chunks=("appointments", 3))
    with pytest.raises(NetworkError):
        tapped.sync("Login")
    delivered = sorted(sent_keys(tap.last, "appointments"))
    with store.write() as conn:  # behind the interrupted download's position
        conn.execute(appointment.delete().where(appointment.c.id == delivered[0]))
    store.prune_tombstones(0)

    result = tapped.sync("Login")

    assert sorted(result.resets) == ["appointments", "doctors"]
    assert delivered[0] not in local_keys(tapped, "LocalAppointment")
    in_sync(tapped)


def test_tombstones_older_than_the_retention_are_pruned(make_server, store, client, in_sync):
    """Time-based retention: what was deleted before the cutoff goes, the rest stays."""
    client.sync("Login")
    mine = appointments_of(store, 1)
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.id == mine[0]))
    cutoff = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    with store.write() as conn:  # recorded after the cutoff (its time is forced later)
        conn.execute(appointment.delete().where(appointment.c.id == mine[1]))
        conn.execute(
            tombstones.update()
            .where(
                tombstones.c.version
                == sa.select(sa.func.max(tombstones.c.version)).scalar_subquery()
            )
            .values(at=(cutoff + dt.timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
        )

    horizon = store.prune_tombstones_before(cutoff)

    with store.engine.connect() as conn:
        left = conn.execute(sa.select(tombstones.c.version)).scalars().all()
    assert len(left) == 1
    assert left[0] > horizon > 0
    result = client.sync("Login")  # its cursor is older than the horizon: a clean re-download
    assert "appointments" in result.resets
    assert not {mine[0], mine[1]} & local_keys(client, "LocalAppointment")
    in_sync(client)


def test_the_server_prunes_by_itself(server, make_server, serve, tmp_path, store):
    """A sync request starts the retention pass (on a background thread, once per interval)."""
    pruning = make_server(tombstone_retention=dt.timedelta(0), prune_every=3600.0)
    with store.write() as conn:
        conn.execute(appointment.delete().where(appointment.c.id == appointments_of(store, 1)[0]))

    def tombstone_count() -> int:
        with store.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(tombstones)).scalar_one()
            )

    assert tombstone_count() == 1
    live = serve(pruning.app)
    with SyncClient(live.url, tmp_path / "p.sqlite", token="token-h1") as c:
        c.sync("Splash")
    for _ in range(500):
        if tombstone_count() == 0:
            break
        threading.Event().wait(0.01)
    assert tombstone_count() == 0
    with store.engine.connect() as conn:
        assert int(store.facts(conn).get("horizon", "0")) > 0
