"""On SQLite a delta finds and reads its changed rows by ``rowid`` (one B-tree per
row, not the key's index and then the table), and a ``WITHOUT ROWID`` base table,
which has none, is read by its key as before (DESIGN 5.1 and 5.6)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from hospital.units import appointments

from syncunit.server import Principal, SyncServer, TokenAuth, changes
from syncunit.units import Stream, SyncSchema, SyncUnit
from tests.support import expected_rows, local_rows

meta = sa.MetaData()
label = sa.Table(
    "label",
    meta,
    sa.Column("code", sa.String(10), primary_key=True),
    sa.Column("shop", sa.Integer, nullable=False),
    sa.Column("text", sa.String(40), nullable=False),
    sqlite_with_rowid=False,
)
labels = Stream(
    "labels",
    label,
    {"code": label.c.code, "text": label.c.text},
    where=label.c.shop == sa.bindparam("shop"),
    local_table="LocalLabel",
)
schema = SyncSchema([SyncUnit("Labels", [labels])])


def _sqlite_only(store: Any) -> None:
    if store.dialect != "sqlite":
        pytest.skip("rowid is SQLite's")


def test_a_delta_reads_its_rows_by_rowid(server: Any) -> None:
    store = server.store
    _sqlite_only(store)
    reader = changes.StreamReader(store, appointments, {"hospital_id": 1}, chunk_size=100)
    with store.snapshot() as (conn, since):
        rowid = reader._rowid(conn)
        assert rowid is not None
        query = reader._delta_queries(pinned=False, rowid=rowid).upserts
        compiled = query.compile(store.engine)
        bound = compiled.construct_params({"hospital_id": 1, changes.SINCE: since})
        args = [bound[k] for k in compiled.positiontup]
        raw = conn.connection.driver_connection
        plan = [r[3] for r in raw.execute("EXPLAIN QUERY PLAN " + str(compiled), args)]
    assert plan[0] == "SEARCH appointment USING INTEGER PRIMARY KEY (rowid=?)", plan
    assert "COVERING INDEX ix_appointment_syncunit_version (syncunit_version>?)" in str(plan)
    assert not [p for p in plan if "sqlite_autoindex_appointment" in p], plan


def test_a_base_table_without_rowid_is_read_by_its_key(store, plain_sql, serve, make_client):
    _sqlite_only(store)
    meta.create_all(store.engine)
    server = SyncServer(schema, store, authenticate=TokenAuth({"t": Principal("p", {"shop": 1})}))
    plain_sql(
        "INSERT INTO label (code, shop, text) VALUES"
        " ('a', 1, 'apples'), ('b', 1, 'bread'), ('c', 2, 'cheese')"
    )
    client = make_client("t", url=serve(server.app).url, name="labels")
    client.sync("Labels")
    with store.snapshot() as (conn, _):
        assert changes.StreamReader(store, labels, {"shop": 1}, chunk_size=10)._rowid(conn) is None

    plain_sql("UPDATE label SET text = 'brown bread' WHERE code = 'b'")
    plain_sql("UPDATE label SET shop = 1 WHERE code = 'c'")
    plain_sql("INSERT INTO label (code, shop, text) VALUES ('d', 1, 'dates')")
    result = client.sync("Labels")

    assert result.rows_in == {"LocalLabel": 3}
    assert local_rows(client, server, labels) == expected_rows(server, labels, {"shop": 1})
