"""Change tracking: the DDL, its installation, and writers that bypass syncunit.

DESIGN section 6: every writer is tracked (the sync server, a backoffice app,
plain SQL); installing is one idempotent call; the DDL can be printed and
applied by a migration tool.
"""

from __future__ import annotations

import sqlalchemy as sa

from syncunit.server import Principal, SyncServer, TokenAuth
from syncunit.server.store import tombstones
from syncunit.units import VERSION, Join, Stream, SyncSchema, SyncUnit
from tests.support import appointments_of, expected_rows, local_rows, trigger_names

# A small schema of its own, so its tables can be created without tracking columns.
mini = sa.MetaData()
owner = sa.Table(
    "owner",
    mini,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(40), nullable=False),
    sa.Column("region", sa.String(20), nullable=False),
)
item = sa.Table(
    "item",
    mini,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("owner_id", sa.Integer, nullable=False),
    sa.Column("name", sa.String(40), nullable=False),
    sa.Column("qty", sa.Integer, nullable=False),
)
items = Stream(
    "items",
    item,
    {"id": item.c.id, "name": item.c.name, "qty": item.c.qty, "owner": owner.c.name},
    joins=[Join(owner, item.c.owner_id == owner.c.id)],
    where=owner.c.region == sa.bindparam("region"),
    local_table="LocalItem",
)
mini_schema = SyncSchema([SyncUnit("Items", [items])])
MINI_TABLES = [
    "CREATE TABLE owner (id INTEGER PRIMARY KEY, name VARCHAR(40) NOT NULL,"
    " region VARCHAR(20) NOT NULL)",
    "CREATE TABLE item (id INTEGER PRIMARY KEY, owner_id INTEGER NOT NULL,"
    " name VARCHAR(40) NOT NULL, qty INTEGER NOT NULL)",
]
NORTH = {"region": "north"}


def _mini_server(store):
    auth = TokenAuth({"t-north": Principal("n", NORTH)})
    return SyncServer(mini_schema, store, authenticate=auth, install=False)


def test_printed_ddl_installs_working_tracking_on_a_fresh_database(
    store, plain_sql, serve, make_client
):
    plain_sql.script(MINI_TABLES)
    ddl = store.tracking_ddl(mini_schema, existing=False)
    assert ddl
    assert all(isinstance(stmt, str) for stmt in ddl)

    plain_sql.script(ddl)  # as a migration tool would: no syncunit involved

    plain_sql.script(
        [
            "INSERT INTO owner (id, name, region) VALUES (1, 'Ana', 'north'), (2, 'Rui', 'south')",
            "INSERT INTO item (id, owner_id, name, qty) VALUES"
            " (1, 1, 'gauze', 5), (2, 1, 'tape', 3), (3, 1, 'mask', 9), (4, 2, 'gloves', 1)",
        ]
    )
    versions = [v for (v,) in plain_sql(f"SELECT {VERSION} FROM item ORDER BY id")]
    assert None not in versions
    # In write order. (SQLite gives each row its own version; PostgreSQL stamps the
    # writing transaction's id, the same for every row of this one transaction.)
    assert versions == sorted(versions)
    server = _mini_server(store)
    client = make_client("t-north", url=serve(server.app).url, name="mini")
    client.sync("Items")
    assert local_rows(client, server, items) == expected_rows(server, items, NORTH)
    assert {r[0] for r in client.store.rows("LocalItem", ["id"])} == {1, 2, 3}

    plain_sql.script(
        [
            "DELETE FROM item WHERE id = 1",
            "UPDATE item SET owner_id = 2 WHERE id = 2",  # leaves the scope
            "UPDATE item SET qty = 99 WHERE id = 3",
            "UPDATE item SET owner_id = 1 WHERE id = 4",  # enters the scope
        ]
    )
    kinds = plain_sql("SELECT kind FROM syncunit_tombstones WHERE table_name = 'item' ORDER BY id")
    assert kinds == [("delete",), ("move",), ("move",)]
    result = client.sync("Items")

    assert result.rows_removed == {"LocalItem": 2}
    assert dict(client.store.rows("LocalItem", ["id", "qty"])) == {3: 99, 4: 1}
    assert local_rows(client, server, items) == expected_rows(server, items, NORTH)


def test_ddl_for_installed_tables_adds_no_columns(server, store):
    ddl = store.tracking_ddl(server.schema)
    assert not [s for s in ddl if "ADD COLUMN" in s.upper()]


def _versions(store, schema):
    out = {}
    with store.engine.connect() as conn:
        for table in schema.tracked_tables():
            pk = next(iter(table.primary_key.columns))
            out[table.name] = sorted(conn.execute(sa.select(pk, table.c[VERSION])).all())
    return out


def test_install_twice_is_idempotent(server, store, client, plain_sql, in_sync):
    client.sync("Login")
    triggers = trigger_names(store.engine)
    versions = _versions(store, server.schema)
    with store.engine.connect() as conn:
        facts = store.facts(conn)

    store.install(server.schema)
    store.install(server.schema)

    assert trigger_names(store.engine) == triggers
    assert len(triggers) == len(set(triggers))
    for table in server.schema.tracked_tables():
        assert len([t for t in triggers if table.name in t]) >= 3  # insert, update, delete
    assert _versions(store, server.schema) == versions
    with store.engine.connect() as conn:
        assert store.facts(conn)["epoch"] == facts["epoch"]
    again = client.sync("Login")
    assert again.resets == []
    assert again.total_in == 0
    # The triggers still work, once each: one delete, one tombstone, one removal.
    gone = appointments_of(store, 1)[0]
    plain_sql("DELETE FROM appointment WHERE id = :id", {"id": gone})
    with store.engine.connect() as conn:
        n = conn.execute(
            sa.select(sa.func.count())
            .select_from(tombstones)
            .where(tombstones.c.old.contains(gone))
        ).scalar_one()
    assert n == 1
    assert client.sync("Login").rows_removed["LocalAppointment"] == 1
    in_sync(client)
