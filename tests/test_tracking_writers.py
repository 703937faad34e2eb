"""Writers that could fool change tracking are still tracked (DESIGN invariants 1, 4, 5).

A stale ORM save, a replace on a unique column, a no-op insert and a bulk
delete, each written with plain SQL as another application would; writers
in PostgreSQL's replica mode; triggers turned off and on again; and, for
writes no trigger can see, ``retrack``, which makes every stream of the
table copy afresh.
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


# -- the application's own triggers (SQLite) ------------------------------------------------

_APP_TRIGGERS = {
    # As written naively: syncunit's stamp (a second UPDATE of the row) fires it again.
    "plain": "AFTER UPDATE ON tag",
    # The two forms the deploy page gives: they never match syncunit's own stamp.
    "of-columns": "AFTER UPDATE OF code, label, region ON tag",
    "when-changed": "AFTER UPDATE ON tag"
    " WHEN OLD.code IS NOT NEW.code OR OLD.label IS NOT NEW.label"
    " OR OLD.region IS NOT NEW.region",
}


@pytest.mark.parametrize("form", list(_APP_TRIGGERS))
def test_an_app_trigger_on_updates_fires_once_in_the_documented_forms(
    backend, form, tag_server, plain_sql
):
    if backend != "sqlite":
        pytest.skip("on PostgreSQL the stamp is a BEFORE trigger: no second update")
    plain_sql.script(
        [
            "CREATE TABLE app_audit (id INTEGER)",
            f"CREATE TRIGGER app_audit_u {_APP_TRIGGERS[form]}"
            " BEGIN INSERT INTO app_audit VALUES (NEW.id); END",
        ]
    )
    plain_sql("INSERT INTO tag (id, code, label, region) VALUES (9, 'z', 'zeta', 'north')")
    plain_sql("UPDATE tag SET label = 'alpha 2' WHERE id = 1")

    fired = dict(plain_sql("SELECT id, count(*) FROM app_audit GROUP BY id"))
    if form == "plain":  # what the deploy page warns of
        assert fired == {9: 1, 1: 2}
    else:
        assert fired == {1: 1}


# -- writers that turn triggers off ---------------------------------------------------------

_OUT_OF_BAND = [
    "UPDATE tag SET region = 'south' WHERE id = 2",
    "DELETE FROM tag WHERE id = 3",
    "UPDATE tag SET label = 'renamed' WHERE id = 1",
]
_AFTER = {1: "renamed"}


def _labels(client):
    return dict(client.store.rows("LocalTag", ["id", "label"]))


def test_writes_in_replica_mode_reach_devices(backend, tag_server, device, plain_sql):
    """Logical replication's apply workers, and restores that turn triggers off this way,
    write with session_replication_role = replica: syncunit's triggers fire all the same."""
    if backend != "postgres":
        pytest.skip("session_replication_role is PostgreSQL's")
    plain_sql.script(["SET LOCAL session_replication_role = replica", *_OUT_OF_BAND])

    result = device.sync("Tags")

    assert result.rows_removed == {"LocalTag": 2}
    assert _labels(device) == _AFTER
    _check(device, tag_server)


def test_triggers_turned_off_and_on_again_reset_the_table_at_the_next_start(
    backend, store, tag_server, serve, make_client, plain_sql
):
    """``DISABLE TRIGGER ALL`` ... ``ENABLE TRIGGER ALL`` (a data-only restore, many
    migrations) leaves them enabled the ordinary way: the next start sees that and
    reinstalls them, and every stream of the table copies afresh."""
    if backend != "postgres":
        pytest.skip("ALTER TABLE ... DISABLE TRIGGER is PostgreSQL's")
    live = serve(tag_server.app)
    client = make_client("t-north", url=live.url, name="tags")
    client.sync("Tags")
    plain_sql.script(
        ["ALTER TABLE tag DISABLE TRIGGER ALL", *_OUT_OF_BAND, "ALTER TABLE tag ENABLE TRIGGER ALL"]
    )
    assert client.sync("Tags").resets == []  # untracked: nothing to deliver yet

    restarted = SyncServer(schema, store, authenticate=tag_server.authenticate)
    live.app = restarted.app
    result = client.sync("Tags")

    assert result.resets == ["tags"]
    assert _labels(client) == _AFTER
    _check(client, restarted)


# -- writes no trigger sees, declared with retrack -------------------------------------------


def _untracked_rewrite(backend, plain_sql):
    """Labels rewritten with no trigger firing, and tracking left as it was."""
    if backend == "postgres":  # a column's type changed, its values rewritten on the way
        plain_sql("ALTER TABLE tag ALTER COLUMN label TYPE varchar(60) USING upper(label)")
        return
    # SQLite: the triggers set aside by hand around the write, then put back as they were.
    triggers = plain_sql("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
    plain_sql.script(
        [f'DROP TRIGGER "{name}"' for name, _ in triggers]
        + ["UPDATE tag SET label = upper(label)"]
        + [sql for _, sql in triggers]
    )


def test_retrack_makes_a_device_that_missed_an_untracked_rewrite_converge(
    backend, store, tag_server, device, plain_sql
):
    _untracked_rewrite(backend, plain_sql)
    assert SyncServer(schema, store, authenticate=tag_server.authenticate)  # a restart
    assert device.sync("Tags").resets == []
    assert _labels(device) == {1: "alpha", 2: "beta", 3: "gamma"}  # missed

    version = tag_server.retrack("tag")

    with store.engine.connect() as conn:
        assert store.facts(conn)["tracking:truncated:tag"] == str(version)
    result = device.sync("Tags")
    assert result.resets == ["tags"]
    assert _labels(device) == {1: "ALPHA", 2: "BETA", 3: "GAMMA"}
    _check(device, tag_server)
    assert device.sync("Tags").resets == []  # once: the cursor it now holds is valid


def test_retrack_refuses_a_table_it_does_not_track_and_changes_nothing(tag_server, store):
    with store.engine.connect() as conn:
        before = store.facts(conn)
    with pytest.raises(ValueError, match=r"table 'tags' is not tracked by this server.*tag"):
        tag_server.retrack("tags")
    with pytest.raises(ValueError, match=r"table 'nope' is not tracked in this database.*tag"):
        store.retrack("nope")
    with store.engine.connect() as conn:
        assert store.facts(conn) == before


# -- partitioned tables (PostgreSQL) ---------------------------------------------------------

pmeta = sa.MetaData()
ptag = sa.Table(
    "ptag",
    pmeta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("label", sa.String(40), nullable=False),
    sa.Column("region", sa.String(20), nullable=False),
)
ptags = Stream(
    "ptags",
    ptag,
    [ptag.c.id, ptag.c.label, ptag.c.region],
    where=ptag.c.region == sa.bindparam("region"),
    local_table="LocalPTag",
)
pschema = SyncSchema([SyncUnit("PTags", [ptags])])


@pytest.fixture
def ptag_server(backend, store, plain_sql):
    if backend != "postgres":
        pytest.skip("partitioned tables are PostgreSQL's")
    plain_sql.script(
        [
            "CREATE TABLE ptag (id integer PRIMARY KEY, label varchar(40) NOT NULL,"
            " region varchar(20) NOT NULL) PARTITION BY RANGE (id)",
            "CREATE TABLE ptag_low PARTITION OF ptag FOR VALUES FROM (0) TO (100)",
            "CREATE TABLE ptag_high PARTITION OF ptag FOR VALUES FROM (100) TO (200)",
        ]
    )
    server = SyncServer(pschema, store, authenticate=TokenAuth({"t-north": Principal("n", NORTH)}))
    plain_sql(
        "INSERT INTO ptag (id, label, region) VALUES"
        " (1, 'a', 'north'), (2, 'b', 'north'), (101, 'c', 'north'), (102, 'd', 'south')"
    )
    return server


@pytest.fixture
def pdevice(ptag_server, serve, make_client):
    client = make_client("t-north", url=serve(ptag_server.app).url, name="ptags")
    client.sync("PTags")
    return client


def _pcheck(client, server):
    assert local_rows(client, server, ptags) == expected_rows(server, ptags, NORTH)


def test_writes_through_partitions_and_in_replica_mode_reach_devices(
    ptag_server, pdevice, plain_sql
):
    plain_sql.script(
        [
            "SET LOCAL session_replication_role = replica",
            "UPDATE ptag_low SET label = 'a2' WHERE id = 1",
            "DELETE FROM ptag_high WHERE id = 101",
            "INSERT INTO ptag_low (id, label, region) VALUES (3, 'e', 'north')",
        ]
    )
    result = pdevice.sync("PTags")
    assert result.rows_removed == {"LocalPTag": 1}
    assert dict(pdevice.store.rows("LocalPTag", ["id", "label"])) == {1: "a2", 2: "b", 3: "e"}
    _pcheck(pdevice, ptag_server)


def test_truncating_one_partition_resets_the_streams_of_its_table(ptag_server, pdevice, plain_sql):
    """A partition's TRUNCATE fires only its own triggers: each has one naming its table."""
    plain_sql("TRUNCATE ptag_high")
    result = pdevice.sync("PTags")
    assert result.resets == ["ptags"]
    assert dict(pdevice.store.rows("LocalPTag", ["id", "label"])) == {1: "a", 2: "b"}
    _pcheck(pdevice, ptag_server)


@pytest.mark.parametrize(
    "change",
    [
        ["ALTER TABLE ptag DETACH PARTITION ptag_high"],
        ["DROP TABLE ptag_high"],
        [
            "CREATE TABLE ptag_more (LIKE ptag INCLUDING ALL)",
            "INSERT INTO ptag_more (id, label, region) VALUES (201, 'f', 'north')",
            "ALTER TABLE ptag ATTACH PARTITION ptag_more FOR VALUES FROM (200) TO (300)",
        ],
    ],
    ids=["detach", "drop", "attach-loaded"],
)
def test_retrack_after_a_partition_changes_makes_devices_converge(
    change, store, ptag_server, pdevice, plain_sql
):
    plain_sql.script(change)
    assert pdevice.sync("PTags").resets == []  # no trigger saw it
    assert local_rows(pdevice, ptag_server, ptags) != expected_rows(ptag_server, ptags, NORTH)

    ptag_server.retrack("ptag")

    assert pdevice.sync("PTags").resets == ["ptags"]
    _pcheck(pdevice, ptag_server)
    assert plain_sql(f"SELECT count(*) FROM ptag WHERE {VERSION} IS NULL") == [(0,)]
