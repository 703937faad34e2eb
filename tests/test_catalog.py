"""The catalog endpoint: units, streams, columns with types and writable flags.

DESIGN section 7: a generic client creates and migrates its local tables from
the catalog; the schema hash is stable for the same schema and changes with it.
"""

from __future__ import annotations

import httpx
import msgspec
import sqlalchemy as sa
from hospital import units as hospital_units
from hospital.models import appointment

from syncunit import Stream, SyncSchema, SyncUnit
from syncunit.protocol import Catalog, CatalogFrame
from tests.test_resets import _appointments_stream, _schema, schema_with_phone


def _get_catalog(url):
    r = httpx.get(url + "/v1/catalog", headers={"Authorization": "Bearer token-h1"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    return msgspec.json.decode(r.content, type=Catalog)


def test_catalog_lists_units_streams_and_columns(live, server):
    catalog = _get_catalog(live.url)

    assert catalog == server.catalog
    assert catalog.protocol == 1
    units = {u.name: u for u in catalog.units}
    assert set(units) >= {"Splash", "Login"}
    assert units["Splash"].streams == ["summary"]
    assert units["Splash"].direction == "pull"
    assert units["Login"].streams == ["doctors", "appointments"]
    assert units["Login"].direction == "pull"

    app = catalog.stream("appointments")
    assert (app.local_table, app.key, app.mode) == ("LocalAppointment", "id", "delta")
    cols = {c.name: c for c in app.columns}
    assert list(cols) == list(hospital_units.appointments.columns)
    assert {n: c.type for n, c in cols.items()} == {
        "id": "text",
        "doctor_id": "integer",
        "patient_id": "integer",
        "starts_at": "datetime",
        "ends_at": "datetime",
        "status": "text",
        "room": "text",
        "notes": "text",
        "patient_name": "text",
        "doctor_name": "text",
        "specialty": "text",
        "hospital": "text",
    }
    writable = {n for n, c in cols.items() if c.writable}
    assert writable == {
        "doctor_id",
        "patient_id",
        "starts_at",
        "ends_at",
        "status",
        "room",
        "notes",
    }
    assert not cols["id"].nullable  # the key
    assert app.indexes == [["starts_at"], ["doctor_id", "starts_at"]]

    doctors = {c.name: c for c in catalog.stream("doctors").columns}
    # no row filter and no write rule: devices may not change doctors at all
    assert not any(c.writable for c in doctors.values())
    assert units["Online"].push == ["LocalAppointment"]
    assert units["SendAppointments"].push == ["LocalAppointment"]

    summary = catalog.stream("summary")
    assert (summary.mode, summary.key, summary.local_table) == ("full", "doctor_id", "LocalSummary")
    assert {c.name: c.type for c in summary.columns} == {
        "doctor_id": "integer",
        "doctor_name": "text",
        "booked": "integer",
        "first_at": "datetime",
    }
    assert not any(c.writable for c in summary.columns)


def test_schema_hash_is_stable_across_servers_built_from_the_same_schema(make_server, live, server):
    again = make_server(install=False)
    declared_again = make_server(
        _schema(_appointments_stream(dict(hospital_units.appointments.columns))), install=False
    )

    assert again.catalog.schema_hash == server.catalog.schema_hash
    assert _get_catalog(live.url).schema_hash == server.catalog.schema_hash
    assert declared_again.catalog.stream("appointments").definition == (
        server.catalog.stream("appointments").definition
    )
    # A different stream definition changes both the stream's and the schema's hash.
    changed = make_server(schema_with_phone(), install=False)
    assert changed.catalog.schema_hash != server.catalog.schema_hash
    assert changed.catalog.stream("appointments").definition != (
        server.catalog.stream("appointments").definition
    )
    assert changed.catalog.stream("doctors").definition == (
        server.catalog.stream("doctors").definition
    )


def test_client_creates_local_tables_from_the_catalog(client):
    catalog = client.catalog()

    for stream in catalog.streams:
        info = client.store.conn.execute(f'PRAGMA table_info("{stream.local_table}")').fetchall()
        assert [r[1] for r in info] == [c.name for c in stream.columns]
        pk = [r[1] for r in info if r[5]]
        assert pk == [stream.key]


def test_a_first_sync_is_one_request_with_the_catalog_inside(tapped, tap, server, in_sync):
    result = tapped.sync("Login")

    assert tap.log == [("POST", "/v1/sync/Login", 200)]
    assert result.requests == 1
    assert tap.last[0] == CatalogFrame(catalog=server.catalog)
    assert tapped.store.catalog() == server.catalog
    in_sync(tapped, "Login")
    # Now the device holds the catalog: the server does not send it again.
    tapped.sync("Login")
    assert not any(isinstance(f, CatalogFrame) for f in tap.last)


def test_a_second_device_of_the_same_user_also_needs_one_request(make_client, tap, in_sync):
    make_client().sync("Login")
    second = make_client(transport=tap)

    second.sync("Login")

    assert tap.log == [("POST", "/v1/sync/Login", 200)]
    in_sync(second, "Login")


def _with_indexes(indexes):
    """The hospital's Splash and Login, the appointments indexed on ``indexes``."""
    base = hospital_units.appointments
    return _schema(
        Stream(
            "appointments",
            appointment,
            dict(base.columns),
            joins=base.joins,
            where=base.where,
            local_table="LocalAppointment",
            indexes=indexes,
        )
    )


def _one_column(nullable: bool) -> SyncSchema:
    table = sa.Table(
        "t",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", sa.Integer, nullable=nullable),
    )
    return SyncSchema([SyncUnit("U", [Stream("s", table, [table.c.id, table.c.v])])])


def test_every_field_of_the_catalog_is_in_the_schema_hash():
    # Neither an index nor a column's nullability changes what a stream sends (its
    # definition), but both change the catalog: devices must get it.
    base = _with_indexes(hospital_units.appointments.indexes).catalog()
    indexed = _with_indexes([["status"]]).catalog()
    assert indexed.stream("appointments").definition == base.stream("appointments").definition
    assert indexed.schema_hash != base.schema_hash
    loose, strict = _one_column(True).catalog(), _one_column(False).catalog()
    assert loose.stream("s").definition == strict.stream("s").definition
    assert loose.stream("s").columns != strict.stream("s").columns
    assert loose.schema_hash != strict.schema_hash


def _index_names(client):
    rows = client.store.conn.execute('PRAGMA index_list("LocalAppointment")')
    return {r[1] for r in rows if not r[1].startswith("sqlite_autoindex")}


def test_an_index_change_reaches_devices_without_copying_rows(make_server, live, tapped, store):
    live.app = make_server(_with_indexes([["starts_at"], ["doctor_id", "starts_at"]])).app
    tapped.sync("Login")
    assert _index_names(tapped) == {
        "ix_LocalAppointment_starts_at",
        "ix_LocalAppointment_doctor_id_starts_at",
    }
    rows = set(tapped.store.rows("LocalAppointment"))
    v2 = make_server(_with_indexes([["status"], ["doctor_id", "starts_at"]]))
    live.app = v2.app

    result = tapped.sync("Login")

    assert tapped.store.catalog() == v2.catalog
    assert _index_names(tapped) == {
        "ix_LocalAppointment_status",
        "ix_LocalAppointment_doctor_id_starts_at",
    }
    assert result.resets == []
    assert result.total_in == 0  # nothing downloaded again
    assert set(tapped.store.rows("LocalAppointment")) == rows
