"""Composite primary keys: joined tables work end to end; a base table is refused at start.

A base table's key becomes the device's single-column local key (and the
cursor's keyset position, the push's row identity), so a stream over a table
keyed by several columns is declined with what to do instead.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from syncunit.errors import DeclarationError
from syncunit.server import Principal, SyncServer, TokenAuth
from syncunit.units import Join, Stream, SyncSchema, SyncUnit
from tests.support import expected_rows, local_rows

meta = sa.MetaData()
shelf = sa.Table(
    "shelf",
    meta,
    sa.Column("site", sa.String(10), primary_key=True),
    sa.Column("code", sa.Integer, primary_key=True),
    sa.Column("zone", sa.String(10), nullable=False),
    sa.Column("label", sa.String(40), nullable=False),
)
box = sa.Table(
    "box",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("site", sa.String(10), nullable=False),
    sa.Column("shelf_code", sa.Integer, nullable=False),
    sa.Column("name", sa.String(40), nullable=False),
)
boxes = Stream(
    "boxes",
    box,
    {"id": box.c.id, "name": box.c.name, "shelf": shelf.c.label},
    joins=[Join(shelf, sa.and_(box.c.site == shelf.c.site, box.c.shelf_code == shelf.c.code))],
    where=shelf.c.zone == sa.bindparam("zone"),
    local_table="LocalBox",
)
schema = SyncSchema([SyncUnit("Boxes", [boxes])])
COLD = {"zone": "cold"}


@pytest.fixture
def device(store, plain_sql, serve, make_client):
    meta.create_all(store.engine)
    server = SyncServer(schema, store, authenticate=TokenAuth({"t": Principal("c", COLD)}))
    plain_sql(
        "INSERT INTO shelf (site, code, zone, label) VALUES"
        " ('lis', 1, 'cold', 'L1'), ('lis', 2, 'cold', 'L2'), ('opo', 1, 'dry', 'O1')"
    )
    plain_sql(
        "INSERT INTO box (id, site, shelf_code, name) VALUES"
        " (1, 'lis', 1, 'a'), (2, 'lis', 2, 'b'), (3, 'opo', 1, 'c'), (4, 'lis', 2, 'd')"
    )
    client = make_client("t", url=serve(server.app).url, name="boxes")
    client.sync("Boxes")
    assert {r[0] for r in client.store.rows("LocalBox", ["id"])} == {1, 2, 4}
    return server, client


def _check(server, client):
    assert local_rows(client, server, boxes) == expected_rows(server, boxes, COLD)


def test_a_joined_table_with_a_composite_key_is_tracked_end_to_end(device, plain_sql):
    server, client = device
    plain_sql("UPDATE shelf SET label = 'L2b' WHERE site = 'lis' AND code = 2")  # rename
    assert client.sync("Boxes").rows_in == {"LocalBox": 2}
    assert dict(client.store.rows("LocalBox", ["id", "shelf"]))[4] == "L2b"

    plain_sql("UPDATE shelf SET zone = 'dry' WHERE site = 'lis' AND code = 2")  # leaves
    plain_sql("UPDATE shelf SET zone = 'cold' WHERE site = 'opo' AND code = 1")  # enters
    result = client.sync("Boxes")
    assert result.rows_removed == {"LocalBox": 2}
    assert {r[0] for r in client.store.rows("LocalBox", ["id"])} == {1, 3}

    plain_sql("DELETE FROM shelf WHERE site = 'lis' AND code = 1")
    assert client.sync("Boxes").rows_removed == {"LocalBox": 1}
    _check(server, client)


def test_a_base_table_with_a_composite_key_is_refused_at_declaration():
    with pytest.raises(DeclarationError) as err:
        Stream("shelves", shelf, [shelf.c.site, shelf.c.code, shelf.c.label])
    message = str(err.value)
    assert "'shelf'" in message
    assert "site, code" in message
    assert "UNIQUE" in message  # says what to do


def test_a_joined_table_without_a_key_is_refused_at_declaration():
    loose = sa.Table(
        "loose", sa.MetaData(), sa.Column("site", sa.String), sa.Column("x", sa.Integer)
    )
    with pytest.raises(DeclarationError, match="'loose' has no primary key"):
        Stream("b2", box, [box.c.id], joins=[Join(loose, box.c.site == loose.c.site)])


def test_a_binary_key_is_refused_at_declaration():
    """Tracking records keys as JSON text: a binary key made every delete of the table
    fail on the server ("JSON cannot hold BLOB values") once tracking was installed."""
    meta = sa.MetaData()
    blob = sa.Table("blob", meta, sa.Column("id", sa.LargeBinary, primary_key=True))
    with pytest.raises(DeclarationError, match="'blob' has a binary key column"):
        Stream("blobs", blob, [blob.c.id])
    with pytest.raises(DeclarationError, match="'blob' has a binary key column"):
        Stream("b3", box, [box.c.id], joins=[Join(blob, box.c.name == blob.c.id)])
