"""Writers that could fool change tracking are still tracked (DESIGN invariants 1, 4, 5).

A stale ORM save, a replace on a unique column, a no-op insert and a bulk
delete, each written with plain SQL as another application would.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from syncunit.server import Principal, SyncServer, TokenAuth
from syncunit.units import VERSION, Stream, SyncSchema, SyncUnit
from tests.support import expected_rows, local_rows

meta = sa.MetaData()
tag = sa.Table(
    "tag",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("code", sa.String(20), nullable=False, unique=True),
    sa.Column("label", sa.String(40), nullable=False),
    sa.Column("region", sa.String(20), nullable=False),
)
tags = Stream(
    "tags",
    tag,
    [tag.c.id, tag.c.code, tag.c.label, tag.c.region],
    where=tag.c.region == sa.bindparam("region"),
    local_table="LocalTag",
)
schema = SyncSchema([SyncUnit("Tags", [tags])])
NORTH = {"region": "north"}


@pytest.fixture
def tag_server(store, plain_sql):
    meta.create_all(store.engine)
    server = SyncServer(schema, store, authenticate=TokenAuth({"t-north": Principal("n", NORTH)}))
    plain_sql(
        "INSERT INTO tag (id, code, label, region) VALUES"
        " (1, 'a', 'alpha', 'north'), (2, 'b', 'beta', 'north'), (3, 'c', 'gamma', 'north'),"
        " (4, 'd', 'delta', 'south')"
    )
    return server


@pytest.fixture
def device(tag_server, serve, make_client):
    client = make_client("t-north", url=serve(tag_server.app).url, name="tags")
    client.sync("Tags")
    return client


def _check(client, server):
    assert local_rows(client, server, tags) == expected_rows(server, tags, NORTH)


def _tracking_state(store, plain_sql):
    versions = plain_sql(f"SELECT id, {VERSION} FROM tag ORDER BY id")
    tombs = plain_sql("SELECT count(*) FROM syncunit_tombstones")
    # PostgreSQL's clock is the cluster's transaction ids: any statement that takes one
    # (an INSERT that ends up doing nothing does) moves it, without changing any row.
    clock = store.current_version() if store.dialect == "sqlite" else None
    return clock, versions, tombs


def test_update_writing_a_stale_version_is_delivered(tag_server, device, plain_sql):
    # An ORM loads tag 1, someone else changes it, the ORM saves its stale copy.
    (stale,) = plain_sql(f"SELECT {VERSION} FROM tag WHERE id = 1")[0]
    plain_sql("UPDATE tag SET label = 'other' WHERE id = 1")
    device.sync("Tags")
    plain_sql(
        f"UPDATE tag SET code = 'a', label = 'orm', region = 'north', {VERSION} = :v WHERE id = 1",
        {"v": stale},
    )
    (now,) = plain_sql(f"SELECT {VERSION} FROM tag WHERE id = 1")[0]
    assert now > stale

    result = device.sync("Tags")

    assert result.rows_in == {"LocalTag": 1}
    assert dict(device.store.rows("LocalTag", ["id", "label"]))[1] == "orm"
    _check(device, tag_server)


def test_replace_on_a_unique_column_removes_the_replaced_row(
    backend, tag_server, device, plain_sql
):
    if backend != "sqlite":
        pytest.skip("INSERT OR REPLACE is SQLite's")
    # Row 1 holds code 'a'; row 9 takes it, so SQLite deletes row 1 (no delete trigger fires).
    plain_sql("INSERT OR REPLACE INTO tag (id, code, label, region) VALUES (9, 'a', 'x', 'south')")
    assert plain_sql("SELECT id FROM tag WHERE code = 'a'") == [(9,)]

    result = device.sync("Tags")

    assert result.rows_removed == {"LocalTag": 1}
    assert {r[0] for r in device.store.rows("LocalTag", ["id"])} == {2, 3}
    _check(device, tag_server)


def test_replace_on_the_key_moving_a_row_out_removes_it(backend, tag_server, device, plain_sql):
    if backend != "sqlite":
        pytest.skip("INSERT OR REPLACE is SQLite's")
    plain_sql("INSERT OR REPLACE INTO tag (id, code, label, region) VALUES (2, 'b', 'y', 'south')")

    assert device.sync("Tags").rows_removed == {"LocalTag": 1}
    _check(device, tag_server)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO tag (id, code, label, region) VALUES (1, 'z', 'q', 'south')"
        " ON CONFLICT DO NOTHING",
        "INSERT INTO tag (id, code, label, region) VALUES (7, 'a', 'q', 'south')"
        " ON CONFLICT DO NOTHING",
        "INSERT OR IGNORE INTO tag (id, code, label, region) VALUES (1, 'z', 'q', 'south')",
        "INSERT OR IGNORE INTO tag (id, code, label, region) VALUES (7, 'b', 'q', 'south')",
    ],
    ids=["do-nothing-key", "do-nothing-unique", "ignore-key", "ignore-unique"],
)
def test_a_no_op_insert_writes_no_tombstone_and_bumps_nothing(
    backend, tag_server, device, plain_sql, store, sql
):
    if backend != "sqlite" and "OR IGNORE" in sql:
        pytest.skip("INSERT OR IGNORE is SQLite's")
    before = _tracking_state(store, plain_sql)

    plain_sql(sql)

    assert _tracking_state(store, plain_sql) == before
    result = device.sync("Tags")
    assert (result.total_in, result.resets) == (0, [])
    _check(device, tag_server)


def test_a_bulk_delete_is_tracked_row_by_row(tag_server, device, plain_sql):
    plain_sql("DELETE FROM tag WHERE region = 'north' AND id <= 2")
    tombs = plain_sql("SELECT kind, count(*) FROM syncunit_tombstones GROUP BY kind")
    assert tombs == [("delete", 2)]

    assert device.sync("Tags").rows_removed == {"LocalTag": 2}
    assert {r[0] for r in device.store.rows("LocalTag", ["id"])} == {3}
    _check(device, tag_server)


def test_update_or_replace_on_a_unique_column_removes_the_replaced_row(
    backend, tag_server, device, plain_sql
):
    if backend != "sqlite":
        pytest.skip("UPDATE OR REPLACE is SQLite's")
    plain_sql("UPDATE OR REPLACE tag SET code = 'a', label = 'took a' WHERE id = 2")
    assert plain_sql("SELECT id FROM tag WHERE code = 'a'") == [(2,)]

    result = device.sync("Tags")

    assert result.rows_removed == {"LocalTag": 1}
    assert dict(device.store.rows("LocalTag", ["id", "label"])) == {2: "took a", 3: "gamma"}
    _check(device, tag_server)


def test_an_upsert_that_moves_a_row_out_removes_it(tag_server, device, plain_sql):
    plain_sql(
        "INSERT INTO tag (id, code, label, region) VALUES (3, 'c', 'gone', 'south')"
        " ON CONFLICT (id) DO UPDATE SET region = excluded.region, label = excluded.label"
    )
    assert device.sync("Tags").rows_removed == {"LocalTag": 1}
    _check(device, tag_server)


def test_a_writer_with_recursive_triggers_is_tracked_once(backend, tag_server, device, store):
    if backend != "sqlite":
        pytest.skip("recursive_triggers is SQLite's")
    import sqlite3

    path = store.engine.url.database
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA recursive_triggers = ON")
        before = store.current_version()
        con.execute("UPDATE tag SET label = 'r' WHERE id = 1")
        assert store.current_version() == before + 1  # its own stamp fires nothing more
        con.execute(
            "INSERT OR REPLACE INTO tag (id, code, label, region) VALUES (8, 'b', 'x', 'south')"
        )
    finally:
        con.close()

    result = device.sync("Tags")

    assert result.rows_removed == {"LocalTag": 1}
    assert dict(device.store.rows("LocalTag", ["id", "label"])) == {1: "r", 3: "gamma"}
    _check(device, tag_server)
